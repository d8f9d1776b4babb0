"""Sampling from a chat model: the one generation loop used by chat, serve, evaluate and labelling.

Our own loop over the KV cache rather than `model.generate`, so that every caller shares the same per-row
sampler (repetition penalty → temperature → top-k → top-p, `chatforge/decoding.py`), the same stop rule
(end-of-turn `<|end|>` or eos), left-padded batches with correct position ids, and token-by-token
streaming with incremental UTF-8 decoding (a byte-level BPE token may hold half of a character).
`chatforge serve` drives the same `decoding.DecodingBatch` with rows joining between steps.
Generation runs in the model's own dtype (fp32 on CPU): benchmarks/generation_speed.py measured bf16
autocast at 0.6-1.0x of fp32 for our model sizes at batch 1 and 8 (decoding is overhead-bound, not matmul-bound).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from itertools import islice
from typing import Callable, Iterator

import torch

from chatforge.decoding import DecodingBatch, Row
from chatforge.decoding import position_ids  # noqa: F401  (PPO imports it from here)
from chatforge.errors import ChatforgeError
from chatforge.params import PARAMS_FILE, load_params, require, section
from chatforge.tokenization import end_of_turn_id, load_tokenizer

REPLACEMENT_CHAR = "\ufffd"


# knob -> (check, what a valid value is); shared by params.yaml validation, CLI flags and `/set` in chat
_SAMPLING_RULES = {
    "temperature": (lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1] (1 = off)"),
    "top_k": (lambda v: v >= 0, "must be >= 0 (0 = off)"),
    "repetition_penalty": (lambda v: v > 0, "must be > 0 (1 = off)"),
    "max_new_tokens": (lambda v: v >= 1, "must be >= 1"),
}


@dataclass
class SamplingParams:
    """params.yaml section `generate`: how replies are sampled."""

    temperature: float = 0.7  # 0 = greedy, deterministic
    top_p: float = 0.9  # nucleus sampling; 1.0 turns it off
    top_k: int = 50  # 0 turns it off
    repetition_penalty: float = 1.1  # 1.0 turns it off (CTRL-style: divides positive logits of seen tokens)
    max_new_tokens: int = 64

    def validate(self, section: str = "generate") -> None:
        for name, (is_valid, expected) in _SAMPLING_RULES.items():
            value = getattr(self, name)
            require(is_valid(value), f"{section}.{name}", f"{expected}, got {value!r}")

    def updated(self, changes: dict[str, object]) -> "SamplingParams":
        """A copy with `changes` applied (values may be strings, as typed in `/set top_k=20`); checked."""
        values = asdict(self)
        for name, raw in changes.items():
            if name not in values:
                raise ChatforgeError(f"unknown setting {name!r}; settings are {', '.join(values)}")
            kind = type(values[name])
            try:
                value = float(raw) if kind is float else int(str(raw).strip())
            except ValueError:
                raise ChatforgeError(f"{name}={raw}: expected a{'n integer' if kind is int else ' number'}") from None
            is_valid, expected = _SAMPLING_RULES[name]
            if not is_valid(value):
                raise ChatforgeError(f"{name}={raw}: {expected}")
            values[name] = value
        return SamplingParams(**values)


def default_sampling(params_file: str | Path = PARAMS_FILE) -> SamplingParams:
    """params.yaml `generate` when run inside the project, else the built-in defaults."""
    if not Path(params_file).exists():
        return SamplingParams()
    return section(SamplingParams, "generate", load_params(params_file))


@dataclass
class Reply:
    text: str  # decoded reply, without the end-of-turn token
    token_ids: list[int]  # generated ids (including the end-of-turn id when it ended)
    ended: bool  # True when the model ended its turn (end-of-turn or eos) before max_new_tokens


# ---------------------------------------------------------------------------------------------- loading


def inference_device() -> torch.device:
    """Where loaded models run (chat, serve, evaluate, sampling for preferences and labels): the GPU when there
    is one, else the CPU. Training stages move their models themselves."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path: str | Path, stage_hint: str = "sft"):
    """(model, tokenizer) from a self-contained model dir, on the inference device; missing or half-built → one
    ChatforgeError line."""
    path = Path(path)
    fix = f"run `dvc repro {stage_hint}`"
    if not path.is_dir():
        raise ChatforgeError(f"{path}: no such model directory; {fix}")
    has_weights = (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()
    if not (path / "config.json").exists() or not has_weights:
        raise ChatforgeError(f"{path}: no model weights (config.json/model.safetensors missing); {fix}")
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise in chat and stages
    try:
        tokenizer = load_tokenizer(path, stage_hint=stage_hint)
        model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, SafetensorError) as error:  # truncated weights, bad config.json
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ChatforgeError(f"{path}: cannot load the model ({first_line}); {fix}") from None
    return model.eval().to(inference_device()), tokenizer


def context_length(model) -> int:
    return int(model.config.max_position_embeddings)


def prompt_budget(model, sampling: SamplingParams) -> int:
    """How many prompt tokens leave room for `max_new_tokens` in the model's context."""
    return max(1, context_length(model) - sampling.max_new_tokens)


# ------------------------------------------------------------------------------------- prompt building


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` rendered with the chat template plus the assistant generation prompt; when the last
    message is the assistant's, its turn is left open instead, so generation continues it (assistant prefill).
    A template that cannot render the conversation raises ValueError or jinja2's TemplateError."""
    continues = messages[-1]["role"] == "assistant"
    ids = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        add_generation_prompt=not continues,
        continue_final_message=continues,
        tokenize=True,
        return_dict=False,
    )
    if hasattr(ids, "keys"):  # some tokenizer versions return a BatchEncoding regardless
        ids = ids["input_ids"]
    return list(ids)


def shared_prompt_prefix(tokenizer) -> list[int]:
    """The ids every one-question prompt starts with: what the template writes before the user's words (a
    default system prompt, the user header). Two different questions rendered agree on exactly that much."""
    first, second = (prompt_ids(tokenizer, [{"role": "user", "content": text}]) for text in ("a", "Z9"))
    shared = next((i for i, (x, y) in enumerate(zip(first, second)) if x != y), min(len(first), len(second)))
    return first[:shared]


def fit_history(tokenizer, messages: list[dict], max_prompt_tokens: int) -> tuple[list[dict], int]:
    """Drop the oldest non-system turns until the prompt fits; returns (messages kept, turns dropped).

    Turns go a whole exchange at a time (a user turn and the replies after it), so the kept history still
    starts with a user turn. The system prompt and the last user turn are always kept; if those alone
    don't fit, that's a ChatforgeError (the message itself is too long).
    """
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    dropped = 0
    while len(prompt_ids(tokenizer, system + turns)) > max_prompt_tokens:
        if len(turns) <= 1:
            size = len(prompt_ids(tokenizer, system + turns))
            raise ChatforgeError(
                f"the message is too long: {size} prompt tokens, the model has room for {max_prompt_tokens}; "
                "send a shorter message (or a shorter --system prompt)"
            )
        next_user = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), len(turns) - 1)
        dropped += next_user
        turns = turns[next_user:]
    return system + turns, dropped


# ---------------------------------------------------------------------------------------- the loop


def stop_ids(tokenizer) -> list[int]:
    ids = {end_of_turn_id(tokenizer)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def sample_tokens(
    model,
    rows: list[list[int]],
    sampling: SamplingParams,
    stop: list[int],
    pad_id: int,
    seed: int | None = None,
    use_cache: bool = True,
    ignore_stop: bool = False,
    unpenalized: list[int] = (),
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, step by step ([batch] long tensor; `pad_id` once a row stopped).

    A static batch on `decoding.DecodingBatch` (rows leave as they stop). Row i draws from its own generator
    seeded `seed + i`, so a row's reply does not depend on the rows beside it. With `use_cache=False` every
    step re-runs the whole sequence (the benchmark's baseline and the tests' reference). `ignore_stop` forces
    `max_new_tokens` steps (for benchmarks). The repetition penalty spares `unpenalized` ids: the chat
    format's special tokens are in every prompt, and a penalized `<|end|>` makes a model ramble on.
    """
    batch = DecodingBatch(model, pad_id, stop, unpenalized, use_cache)
    sequences = [Row(row, sampling, None if seed is None else seed + i, ignore_stop) for i, row in enumerate(rows)]
    index = {id(row): i for i, row in enumerate(sequences)}
    advanced = batch.add(sequences)
    while advanced:
        next_ids = torch.full((len(rows),), pad_id, dtype=torch.long)
        for row in advanced:
            next_ids[index[id(row)]] = row.tokens[-1]
        yield next_ids
        advanced = batch.step()


class IncrementalDecoder:
    """Text pieces of a growing token sequence; holds back tokens that end inside a UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if text.endswith(REPLACEMENT_CHAR):
            return ""  # the character's remaining bytes come with the next tokens
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True) if self.pending else ""
        self.pending = []
        return text


def _stream(model, tokenizer, messages: list[dict], sampling: SamplingParams, seed: int | None, result: list[int]):
    stop = stop_ids(tokenizer)
    decoder = IncrementalDecoder(tokenizer)
    rows = [prompt_ids(tokenizer, messages)]
    for next_ids in sample_tokens(
        model, rows, sampling, stop, tokenizer.pad_token_id, seed, unpenalized=tokenizer.all_special_ids
    ):
        token_id = int(next_ids[0])
        result.append(token_id)
        if token_id in stop:
            break
        piece = decoder.push(token_id)
        if piece:
            yield piece
    rest = decoder.flush()
    if rest:
        yield rest


def stream_reply(
    model, tokenizer, messages: list[dict], sampling: SamplingParams, seed: int | None = None
) -> Iterator[str]:
    """Yield the reply to `messages` (ending in a user turn) as text pieces, as the tokens come."""
    yield from _stream(model, tokenizer, messages, sampling, seed, [])


def generate_reply(model, tokenizer, messages: list[dict], sampling: SamplingParams, seed: int | None = None) -> Reply:
    token_ids: list[int] = []
    text = "".join(_stream(model, tokenizer, messages, sampling, seed, token_ids))
    return Reply(text=text, token_ids=token_ids, ended=bool(token_ids) and token_ids[-1] in stop_ids(tokenizer))


def generate_replies(
    model,
    tokenizer,
    conversations: list[list[dict]],
    sampling: SamplingParams,
    seed: int | None = None,
    batch_size: int = 8,
) -> list[Reply]:
    """Replies to many conversations (each ending in a user turn); see `generate_from_ids`."""
    prompts = [prompt_ids(tokenizer, messages) for messages in conversations]
    return generate_from_ids(model, tokenizer, prompts, sampling, seed, batch_size)


def generate_from_ids(
    model,
    tokenizer,
    prompts: list[list[int]],
    sampling: SamplingParams,
    seed: int | None = None,
    batch_size: int = 8,
    on_finished: Callable[[int], None] | None = None,
) -> list[Reply]:
    """Replies to tokenized prompts, at most `batch_size` decoding at once (continuous batching, as serve does):
    a row that ends makes room for the next prompt, which joins at the next step, so a long reply never holds
    a batch of finished rows. Prompt i samples with seed `seed + i`, so its reply does not depend on
    `batch_size` or on its neighbours. `on_finished(count)` is told how many replies each step finished."""
    batch = DecodingBatch(model, tokenizer.pad_token_id, stop_ids(tokenizer), tokenizer.all_special_ids)
    rows = [Row(ids, sampling, None if seed is None else seed + i) for i, ids in enumerate(prompts)]
    waiting = iter(rows)
    while True:
        joining = list(islice(waiting, batch_size - len(batch)))
        if not joining and not len(batch):
            break
        advanced = batch.step(joining=joining)
        if on_finished is not None:
            on_finished(sum(row.done for row in advanced))
    return [Reply(tokenizer.decode(row.tokens[:-1] if row.ended else row.tokens, skip_special_tokens=True),
                  row.tokens, row.ended) for row in rows]
