"""How a row draws its next token: the sampling settings (params.yaml `generate`), the per-row sampler and the
log-probabilities it reports.

Every row carries its own sampling parameters and its own random generator, so a row's tokens depend only on
its logits, never on the other rows: a greedy or seeded row draws what it would draw alone, as long as its
logits agree with the lone run's (batched fp32 matmuls may round the last bits differently; docs/serving.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from chatforge.errors import ChatforgeError
from chatforge.params import PARAMS_FILE, load_params, require, section

GREEDY_BELOW = 1e-5  # temperatures this low decode greedily: dividing logits by them overflows fp32 (as vLLM)


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
class TokenLogprob:
    """A drawn token's log-probability under the model (log-softmax of its raw logits: before the repetition
    penalty, temperature, top-k and top-p, as vLLM's default `raw_logprobs`) and the `top` most likely
    (token id, log-probability) pairs, best first."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class Row:
    """One sequence being decoded: its prompt, how it samples, and the tokens drawn so far."""

    prompt: list[int]
    sampling: SamplingParams
    seed: int | None = None  # its own generator: the same draws whatever shares the batch
    ignore_eos: bool = False  # stop tokens do not end it: fixed-length replies for benchmarks (as vLLM's)
    logprobs: int | None = None  # None: none; k >= 0: each drawn token's TokenLogprob with its k best alternatives
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token when `logprobs` is set
    ended: bool = False  # drew a stop token (end of turn or eos)

    def __post_init__(self):
        self.generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)

    @property
    def done(self) -> bool:
        return self.ended or len(self.tokens) >= self.sampling.max_new_tokens


def next_tokens(logits: torch.Tensor, rows: Sequence[Row], seen_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row from fp32 `logits` [rows, vocab], each row with its own settings and generator.

    Order: repetition penalty on each row's `seen_ids` [rows, m] (-1: none; a token may repeat; CTRL-style:
    positive logits divided, negative multiplied) → greedy rows take the argmax → temperature → top-k → top-p
    (a token goes when the tokens ranked before it already cover top_p; the best one always stays) → one uniform
    draw per row from its own generator, mapped through the row's cumulative distribution (one batched search,
    not a call per row).
    """
    if seen_ids is not None and seen_ids.numel() and any(row.sampling.repetition_penalty != 1 for row in rows):
        logits = _penalize(logits, seen_ids, logits.new_tensor([row.sampling.repetition_penalty for row in rows]))
    choice = torch.zeros(len(rows), dtype=torch.long, device=logits.device)
    is_sampled = [row.sampling.temperature >= GREEDY_BELOW and row.sampling.top_k != 1 for row in rows]
    sampled = [i for i, flag in enumerate(is_sampled) if flag]
    if greedy := [i for i, flag in enumerate(is_sampled) if not flag]:
        choice[greedy] = logits[greedy].argmax(dim=-1)
    if not sampled:
        return choice
    settings = [rows[i].sampling for i in sampled]
    logits = (logits if len(sampled) == len(rows) else logits[sampled]) / logits.new_tensor(
        [s.temperature for s in settings])[:, None]
    vocab = logits.shape[-1]
    top_k = torch.tensor([s.top_k if 0 < s.top_k < vocab else vocab for s in settings], device=logits.device)
    top_p = logits.new_tensor([s.top_p for s in settings])[:, None]
    order = None
    if bool((top_k < vocab).any() or (top_p < 1).any()):
        # the best tokens, best first: only the largest k when every row has a top-k, else the whole vocabulary
        logits, order = torch.topk(logits, int(top_k.max()), dim=-1)
        logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= top_k[:, None], float("-inf"))
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(((probs.cumsum(dim=-1) - probs) >= top_p) & (top_p < 1), float("-inf"))
    cumulative = logits.softmax(dim=-1).cumsum(dim=-1).cpu()
    uniform = torch.stack([torch.rand((), generator=rows[i].generator) for i in sampled])  # CPU generators
    picked = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True)
    picked = picked.clamp(max=cumulative.shape[-1] - 1).to(logits.device)
    choice[sampled] = picked[:, 0] if order is None else order.gather(1, picked)[:, 0]
    return choice


def token_logprobs(logits: torch.Tensor, rows: Sequence[Row], chosen: torch.Tensor) -> list[TokenLogprob | None]:
    """Each row's TokenLogprob of its `chosen` token under fp32 `logits` [rows, vocab] (None for rows that did not
    ask): one log-softmax over the rows that asked, never over the others."""
    asking = [i for i, row in enumerate(rows) if row.logprobs is not None]
    scored: list[TokenLogprob | None] = [None] * len(rows)
    if not asking:
        return scored
    logprobs = torch.log_softmax(logits[asking], dim=-1)
    picked = logprobs.gather(1, chosen[asking, None])[:, 0].tolist()
    best = max(rows[i].logprobs for i in asking)
    top_values, top_ids = logprobs.topk(best, dim=-1)
    for i, value, values, ids in zip(asking, picked, top_values.tolist(), top_ids.tolist()):
        k = rows[i].logprobs
        scored[i] = TokenLogprob(value, list(zip(ids[:k], values[:k])))
    return scored


def _penalize(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """`logits` with the penalty applied once to each seen token: only the seen entries are read and written (a
    dense [rows, vocab] mask cost more than the rest of the sampler). Entries of -1 go to a spare column."""
    vocab = logits.shape[-1]
    columns = torch.where(seen_ids >= 0, seen_ids, vocab)
    padded = torch.cat([logits, logits.new_zeros((logits.shape[0], 1))], dim=1)
    values = padded.gather(1, columns)
    penalty = penalty[:, None]
    padded.scatter_(1, columns, torch.where(values > 0, values / penalty, values * penalty))
    return padded[:, :vocab]
