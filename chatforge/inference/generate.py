"""Sampling from a chat model: the one generation loop used by chat, serve, evaluate and labelling.

Our own loop over the KV cache rather than `model.generate`, so that every caller shares the same per-row
sampler (repetition penalty → temperature → top-k → top-p, `inference/sampling.py`), the same stop rule
(end-of-turn `<|end|>` or eos, `prompting.stop_ids`), left-padded batches with correct position ids, and token-by-token
streaming with incremental UTF-8 decoding (a byte-level BPE token may hold half of a character).
`chatforge serve` drives the same `batch.DecodingBatch` with rows joining between steps.
Generation runs in the model's own dtype (fp32 on CPU): benchmarks/generation_speed.py measured bf16
autocast at 0.6-1.0x of fp32 for our model sizes at batch 1 and 8 (decoding is overhead-bound, not matmul-bound).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterator

import torch

from chatforge.inference.batch import DecodingBatch
from chatforge.inference.sampling import Row
from chatforge.inference.prompting import prompt_ids, stop_ids
from chatforge.inference.sampling import SamplingParams

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class Reply:
    text: str  # decoded reply, without the end-of-turn token
    token_ids: list[int]  # generated ids (including the end-of-turn id when it ended)
    ended: bool  # True when the model ended its turn (end-of-turn or eos) before max_new_tokens


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
