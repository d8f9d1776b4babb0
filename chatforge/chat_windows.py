"""Fit chat conversations into the model's context without losing assistant tokens silently.

A conversation is rendered once with the tokenizer's chat template (`render`: the tokens of each reply and
of what closes it, e.g. `<|end|>`, are the trained ones). It is then cut into windows of at most
`max_length` tokens, each the template's preamble (our `<|bos|>`) + a run of whole turns:

- a window trains on the turns not yet trained on (its *targets*: as many whole turns as fit, ending at
  an assistant turn) and is preceded by as much earlier history (whole turns, newest first) as still fits;
  assistant turns in that history are context only (label -100), so no token is trained twice;
- when even one assistant turn with the turns since the last window does not fit, the window keeps that
  turn whole if it can (with the newest context tokens that fit), else its first tokens; the assistant
  tokens that do not fit are counted as *cut*.

Every assistant token is therefore either trained on or counted as cut: kept + cut == total.
"""
from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field

from chatforge.console import progress
from chatforge.conversation import InvalidRecord
from chatforge.errors import ChatforgeError
from chatforge.files import SkipLog
from chatforge.tokenization import chat_text, preamble_text

IGNORE_INDEX = -100  # the label that losses ignore (transformers, trl, torch cross_entropy)


@dataclass
class FitStats:
    conversations: int = 0
    windows: int = 0
    sequence_tokens: int = 0           # all tokens of all windows (what the model reads)
    assistant_tokens: int = 0          # assistant tokens in the rendered conversations
    assistant_tokens_trained: int = 0  # of those, labelled in some window
    assistant_tokens_cut: int = 0      # of those, in no window (a single turn longer than the context)
    windows_with_cut_context: int = 0  # windows whose context starts mid-turn to make room
    skipped: dict = field(default_factory=dict)

    def add(self, other: "FitStats") -> None:
        for name, value in asdict(other).items():
            if isinstance(value, int):
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Rendered:
    """A conversation rendered with the tokenizer's chat template."""

    ids: list[int]
    mask: list[int]     # 1 on the tokens trained on: each reply and the tokens that close it
    bounds: list[int]   # where each turn's tokens start, then len(ids); ids[:bounds[0]] is the preamble


def render(tokenizer, turns: list[dict]) -> Rendered:
    """Tokens, reply mask and turn boundaries of a conversation, for any chat template.

    The template renders every prefix of the conversation (and, before each reply, the prefix with the
    generation prompt); the character lengths of those renderings mark where each turn and each reply
    start in the whole rendering, which is tokenized once, as generation tokenizes a prompt. So a reply is
    exactly what follows the generation prompt: its text and the tokens that close it (`<|end|>`, or
    ChatML's `<|im_end|>` and newline), whether or not the template has `{% generation %}` blocks.

    Content holding the text of a special token (e.g. "<|end|>") would be read as that token and break the
    turn structure: such a conversation is rejected with a counted reason.
    """
    messages = [{"role": t["role"], "content": t["content"]} for t in turns]
    def text(count: int, generation_prompt: bool = False) -> str:
        if count == 0 and not generation_prompt:
            return preamble_text(tokenizer)
        return chat_text(tokenizer, messages[:count], generation_prompt)

    full = text(len(messages))
    # one tokenizer call for the whole rendering and each content (the calls' overhead is most of the cost)
    encoded = tokenizer([full] + [m["content"] for m in messages], add_special_tokens=False,
                        return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids)
    if any(token in special for ids in encoded["input_ids"][1:] for token in ids):
        raise InvalidRecord("special_token_text", "a turn contains the text of a chat special token")
    ids, ends = encoded["input_ids"][0], [end for _, end in encoded["offset_mapping"][0]]

    def token_index(prefix: str) -> int:
        """How many tokens of the whole rendering `prefix` covers."""
        if not full.startswith(prefix):
            raise ChatforgeError("the chat template does not render a conversation as the rendering of its first "
                                 "turns plus the next ones; chatforge needs a prefix-consistent template")
        return bisect.bisect_right(ends, len(prefix))

    bounds = [token_index(text(count)) for count in range(len(messages) + 1)]
    mask = [0] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            reply_start = token_index(text(k, generation_prompt=True))
            mask[reply_start:bounds[k + 1]] = [1] * (bounds[k + 1] - reply_start)
    return Rendered(list(ids), mask, bounds)


def fit_conversation(tokenizer, turns: list[dict], max_length: int) -> tuple[list[dict], FitStats]:
    """Windows {"input_ids", "labels"} of one conversation, and its counts."""
    rendered = render(tokenizer, turns)
    ids, mask, bounds = rendered.ids, rendered.mask, rendered.bounds
    preamble = ids[:bounds[0]]
    budget = max_length - len(preamble)  # every window starts with the preamble (our <|bos|>)
    assistant_turns = [k for k, t in enumerate(turns) if t["role"] == "assistant"]
    stats = FitStats(conversations=1, assistant_tokens=sum(mask))
    windows = []

    def add_window(context: range, targets: range) -> None:
        input_ids = preamble + [ids[i] for i in context] + [ids[i] for i in targets]
        labels = [IGNORE_INDEX] * (len(preamble) + len(context)) + [ids[i] if mask[i] else IGNORE_INDEX for i in targets]
        windows.append({"input_ids": input_ids, "labels": labels})
        stats.windows += 1
        stats.sequence_tokens += len(input_ids)
        stats.assistant_tokens_trained += sum(mask[i] for i in targets)

    start = 0  # first turn not trained on yet
    for position, first in enumerate(assistant_turns):
        if first < start:
            continue
        if bounds[first + 1] - bounds[start] > budget:
            # Too long even alone: keep the assistant turn (its first `budget` tokens at most) and the newest
            # context tokens that fit before it; count the assistant tokens left out.
            turn_start, turn_end = bounds[first], bounds[first + 1]
            kept_end = min(turn_end, turn_start + budget)
            context_start = max(bounds[0], turn_start - (budget - (kept_end - turn_start)))
            add_window(range(context_start, turn_start), range(turn_start, kept_end))
            stats.assistant_tokens_cut += sum(mask[kept_end:turn_end])
            stats.windows_with_cut_context += int(context_start not in bounds)
            start = first + 1
            continue
        end = first + 1
        for later in assistant_turns[position + 1:]:
            if bounds[later + 1] - bounds[start] > budget:
                break
            end = later + 1
        history = start
        while history > 0 and bounds[end] - bounds[history - 1] <= budget:
            history -= 1
        add_window(range(bounds[history], bounds[start]), range(bounds[start], bounds[end]))
        start = end
    return windows, stats


def fit_conversations(tokenizer, records: list[dict], max_length: int, skips: SkipLog | None = None,
                      desc: str = "fitting") -> tuple[list[dict], FitStats]:
    """Windows of every conversation record, and the summed counts (skips counted by reason)."""
    skips = skips if skips is not None else SkipLog()
    total = FitStats()
    windows = []
    with progress(transient=True) as bar:
        task = bar.add_task(desc, total=len(records), info="")
        for record in records:
            try:
                found, stats = fit_conversation(tokenizer, record["turns"], max_length)
            except InvalidRecord as error:
                skips.skip(error.reason, str(record.get("id")), str(error))
            else:
                windows.extend(found)
                total.add(stats)
            bar.update(task, advance=1, info=f"{total.windows} windows")
    total.skipped = skips.as_dict()
    return windows, total
