"""Fit chat conversations into the model's context without losing assistant tokens silently.

A conversation is rendered once with the chat template (`return_assistant_tokens_mask` marks the tokens
inside `{% generation %}`: assistant content and its `<|end|>`). It is then cut into windows of at most
`max_length` tokens, each `<|bos|>` + a run of whole turns:

- a window trains on the turns not yet trained on (its *targets*: as many whole turns as fit, ending at
  an assistant turn) and is preceded by as much earlier history (whole turns, newest first) as still fits;
  assistant turns in that history are context only (label -100), so no token is trained twice;
- when even one assistant turn with the turns since the last window does not fit, the window keeps that
  turn whole if it can (with the newest context tokens that fit), else its first tokens; the assistant
  tokens that do not fit are counted as *cut*.

Every assistant token is therefore either trained on or counted as cut: kept + cut == total.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from chatforge.console import progress
from chatforge.conversation import InvalidRecord
from chatforge.files import SkipLog

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


def render(tokenizer, turns: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and its assistant mask (1 on trained tokens)."""
    encoded = tokenizer.apply_chat_template(
        [{"role": t["role"], "content": t["content"]} for t in turns],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return list(encoded["input_ids"]), list(encoded["assistant_masks"])


def _turn_bounds(tokenizer, turns: list[dict], ids: list[int]) -> list[int]:
    """Start position of each turn in `ids`, plus len(ids); every turn starts with its role token.

    Content that contains the text of a special token (e.g. "<|end|>") is tokenized as that token and
    would break the turn structure: such a conversation is rejected with a counted reason.
    """
    special = set(tokenizer.all_special_ids)
    positions = [i for i, token in enumerate(ids) if token in special]
    if ids[:1] != [tokenizer.bos_token_id] or len(positions) != 1 + 2 * len(turns):
        raise InvalidRecord("special_token_text", "a turn contains the text of a chat special token")
    return positions[1::2] + [len(ids)]


def fit_conversation(tokenizer, turns: list[dict], max_length: int) -> tuple[list[dict], FitStats]:
    """Windows {"input_ids", "labels"} of one conversation, and its counts."""
    ids, mask = render(tokenizer, turns)
    bounds = _turn_bounds(tokenizer, turns, ids)
    budget = max_length - 1  # every window starts with <|bos|>
    assistant_turns = [k for k, t in enumerate(turns) if t["role"] == "assistant"]
    stats = FitStats(conversations=1, assistant_tokens=sum(mask))
    windows = []

    def add_window(context: range, targets: range) -> None:
        input_ids = [tokenizer.bos_token_id] + [ids[i] for i in context] + [ids[i] for i in targets]
        labels = [IGNORE_INDEX] * (1 + len(context)) + [ids[i] if mask[i] else IGNORE_INDEX for i in targets]
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
