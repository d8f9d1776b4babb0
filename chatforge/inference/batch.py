"""Decoding many sequences together: the batch that chat, evaluate and serve share.

A `DecodingBatch` holds rows over one left-padded KV cache (a transformers `DynamicCache` whose
[batch, heads, length, dim] tensors we pad, join and index on the batch axis; its layers keep room to grow, so a
decode step writes its token in place rather than copying the whole cache). Rows join between steps, their
prompts prefilled together in one forward pass, and leave the moment they finish; one `step` feeds every row
its last token. A static batch
(evaluate, `generate.sample_tokens`) is the case where nobody joins later; `chatforge serve` admits new
requests between steps (continuous batching). The cache's layers are `kv_cache.GrowingLayer`s.

Every row carries its own sampling parameters and its own random generator, so a row's tokens depend only on
its logits, never on the other rows: a greedy or seeded row draws what it would draw alone, as long as its
logits agree with the lone run's (batched fp32 matmuls may round the last bits differently; docs/serving.md).
Position ids count each row's real tokens, so left padding changes no position.

Rows that join a running batch (`step(joining=...)`) are prefilled in the running rows' decode step rather than
in a pass of their own (`packed_attention`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache

from chatforge.errors import ChatforgeError
from chatforge.inference.kv_cache import GrowingCache
from chatforge.inference.packed_attention import PACKED_ATTENTION, Packing
from chatforge.inference.sampling import Row, next_tokens, token_logprobs


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `rows` right-aligned in one tensor."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded rows: 0 at each row's first real token (pads clamp to 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _pad_left(tensor: torch.Tensor, width: int, dim: int, value=0) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_full(shape, value), tensor], dim=dim)


class DecodingBatch:
    """Rows decoded together over one left-padded KV cache; rows join (`add`) and leave between steps.

    `add` and `step` sample one token for each row they touch, append it to `row.tokens` and return those
    rows; rows that are then done (a stop token, or `max_new_tokens`) have already left the batch. `remove`
    takes rows out early (a client gone). With `use_cache=False` every step re-runs each whole sequence (the
    tests' reference). A cache layer is padded and indexed like any attention cache: models whose cache
    holds other state (recurrent layers) are not supported.

    `prefix` (ids most prompts start with, such as a template's default system prompt) is computed once:
    prompts that start with it are prefilled from its cached keys and values, only their own tokens run.
    Such a row's cache is prefix, padding, own tokens; the mask hides the gap and positions count real tokens.
    """

    def __init__(self, model, pad_id: int, stop: Sequence[int], unpenalized: Sequence[int] = (),
                 use_cache: bool = True, prefix: Sequence[int] = ()):
        self.model = model
        self.device = next(model.parameters()).device
        self.context = int(model.config.max_position_embeddings)
        self.vocab = int(model.config.vocab_size)
        self.pad_id = pad_id
        self.stop = frozenset(stop)
        # special tokens are in every prompt; a penalized end of turn rambles
        self.unpenalized = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
        self.unpenalized[[i for i in unpenalized if i < self.vocab]] = True
        self.use_cache = use_cache
        self.prefix = list(prefix) if use_cache else []
        self._prefix_cache = self._prefill_prefix() if self.prefix else None
        self._clear()

    def _clear(self) -> None:
        self.rows: list[Row] = []
        self.ids = torch.empty((0, 0), dtype=torch.long, device=self.device)  # every row's tokens, left-padded
        self.mask = torch.empty((0, 0), dtype=torch.long, device=self.device)
        self.cache: DynamicCache | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, rows: list[Row]) -> list[Row]:
        """Prefill `rows` in one forward pass, sample their first tokens and make them part of the batch."""
        self._check_fit(rows)
        if self._share_prefix(rows):
            ids, mask, cache, logits = self._prefill_after_prefix(rows)
        else:
            ids, mask = (tensor.to(self.device) for tensor in left_pad([row.prompt for row in rows], self.pad_id))
            cache = GrowingCache() if self.use_cache else None
            logits = self._forward(ids, mask, position_ids(mask), cache)
        self._join(rows, ids, mask, cache)
        return self._advance(logits, slice(len(self.rows) - len(rows), None))

    @torch.inference_mode()
    def step(self, joining: list[Row] = ()) -> list[Row]:
        """One token for every row: feed each row its last token, sample the next. Rows `joining` are prefilled
        in the same forward pass and draw their first token (a packed step); where the batch cannot pack (no
        cache, or a model whose attention is not transformers' SDPA) they are prefilled on their own instead and
        the running rows wait for the next step."""
        if joining:
            if not self.rows or not self._can_pack():
                return self.add(joining)
            return self._packed_step(joining)
        if not self.rows:
            return []
        last = torch.tensor([row.tokens[-1] for row in self.rows], dtype=torch.long, device=self.device)[:, None]
        positions = self.mask.sum(dim=-1, keepdim=True)  # each row's count of real tokens is the next position
        self.ids = torch.cat([self.ids, last], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(last)], dim=1)
        if self.use_cache:
            logits = self._forward(last, self.mask, positions, self.cache)
        else:
            logits = self._forward(self.ids, self.mask, position_ids(self.mask), None)
        return self._advance(logits, slice(None))

    @torch.inference_mode()  # the cache's buffers are inference tensors, edited in place
    def remove(self, rows: list[Row]) -> None:
        """Take `rows` out of the batch now (their cache rows are freed)."""
        leaving = {id(row) for row in rows}
        if leaving:
            self._keep([i for i, row in enumerate(self.rows) if id(row) not in leaving])

    # ------------------------------------------------------------------------------------ internals

    def _check_fit(self, rows: list[Row]) -> None:
        for row in rows:
            if len(row.prompt) + row.sampling.max_new_tokens > self.context:
                raise ChatforgeError(
                    f"prompt of {len(row.prompt)} tokens + max_new_tokens {row.sampling.max_new_tokens} exceed the "
                    f"model's context of {self.context}; shorten the history to "
                    f"{self.context - row.sampling.max_new_tokens} tokens (prompting.fit_history)")

    def _share_prefix(self, rows: list[Row]) -> bool:
        return bool(self.prefix) and all(
            len(row.prompt) > len(self.prefix) and row.prompt[: len(self.prefix)] == self.prefix for row in rows)

    def _can_pack(self) -> bool:
        """Switches the model to PACKED_ATTENTION (SDPA until a pass packs) if it runs SDPA; False if it cannot."""
        if self.use_cache and self.model.config._attn_implementation == "sdpa":
            self.model.set_attn_implementation(PACKED_ATTENTION)  # a model not built on AttentionInterface stays
        return self.use_cache and self.model.config._attn_implementation == PACKED_ATTENTION

    def _packed_step(self, joining: list[Row]) -> list[Row]:
        """`step` for the running rows and `add` for `joining`, in one forward pass over the packed tokens."""
        self._check_fit(joining)
        running = len(self.rows)
        last = [row.tokens[-1] for row in self.rows]
        positions = self.mask.sum(dim=-1)
        self.ids = torch.cat([self.ids, torch.tensor(last, dtype=torch.long, device=self.device)[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)

        prefix = len(self.prefix) if self._share_prefix(joining) else 0
        own = [row.prompt[prefix:] for row in joining]
        own_ids, own_mask = (t.to(self.device) for t in left_pad(own, self.pad_id))
        count, width = own_ids.shape
        real = own_mask.bool().flatten()
        own_index = real.nonzero()[:, 0]
        causal = torch.ones((width, width), dtype=torch.bool, device=self.device).tril()
        own_view = (causal & own_mask.bool()[:, None, :]) | torch.eye(width, dtype=torch.bool, device=self.device)
        joining_mask = torch.cat([torch.ones((count, width, prefix), dtype=torch.bool, device=self.device), own_view],
                                 dim=2)[:, None]  # a padding query sees itself: no row of the mask is empty
        packing = Packing(self.cache, running, self.mask.bool()[:, None, None, :], own_index, count, width,
                          joining_mask, self._prefix_cache if prefix else None)

        ids = torch.cat([self.ids[:, -1], own_ids.flatten()[real]])[None]
        packed_positions = torch.cat([positions, (prefix + position_ids(own_mask)).flatten()[real]])[None]
        ends = running + torch.tensor([len(tokens) for tokens in own], device=self.device).cumsum(0) - 1
        keep = torch.cat([torch.arange(running, device=self.device), ends])
        output = self.model(input_ids=ids, position_ids=packed_positions, use_cache=False, logits_to_keep=keep,
                            packing=packing)
        if prefix:
            prefix_ids = torch.tensor([self.prefix] * count, dtype=torch.long, device=self.device)
            own_ids = torch.cat([prefix_ids, own_ids], dim=1)
            own_mask = torch.cat([torch.ones_like(prefix_ids), own_mask], dim=1)
        self._join(joining, own_ids, own_mask, cache=None)  # the attention already added their keys and values
        return self._advance(output.logits[0].float(), slice(None))

    @torch.inference_mode()
    def _prefill_prefix(self) -> DynamicCache:
        ids = torch.tensor([self.prefix], dtype=torch.long, device=self.device)
        cache = GrowingCache()
        self._forward(ids, torch.ones_like(ids), position_ids(torch.ones_like(ids)), cache)
        return cache

    def _prefill_after_prefix(self, rows: list[Row]):
        """(ids, mask, cache, logits) of `rows` whose prompts start with the prefix: their own tokens run
        over the prefix's cached keys and values."""
        count, width = len(rows), len(self.prefix)
        own_ids, own_mask = (t.to(self.device) for t in left_pad([row.prompt[width:] for row in rows], self.pad_id))
        cache = GrowingCache([(keys.expand(count, -1, -1, -1), values.expand(count, -1, -1, -1))
                                             for keys, values, _ in self._prefix_cache])
        mask = torch.cat([torch.ones((count, width), dtype=torch.long, device=self.device), own_mask], dim=1)
        logits = self._forward(own_ids, mask, width + position_ids(own_mask), cache)
        prefix_ids = torch.tensor([self.prefix] * count, dtype=torch.long, device=self.device)
        return torch.cat([prefix_ids, own_ids], dim=1), mask, cache, logits

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        output = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=cache is not None, logits_to_keep=1)
        return output.logits[:, -1, :].float()

    def _advance(self, logits: torch.Tensor, which: slice) -> list[Row]:
        """Sample the next token of rows `which` (aligned with `logits`); done rows leave the batch."""
        rows, ids = self.rows[which], self.ids[which]
        seen_ids = torch.where(self.mask[which].bool() & ~self.unpenalized[ids], ids, -1)
        chosen = next_tokens(logits, rows, seen_ids)
        for row, token, scored in zip(rows, chosen.tolist(), token_logprobs(logits, rows, chosen)):
            row.tokens.append(token)
            if scored is not None:
                row.token_logprobs.append(scored)
            row.ended = token in self.stop and not row.ignore_eos
        if any(row.done for row in rows):
            self._keep([i for i, row in enumerate(self.rows) if not row.done])
        return rows

    def _join(self, rows: list[Row], ids, mask, cache) -> None:
        if not self.rows:
            self.rows, self.ids, self.mask, self.cache = list(rows), ids, mask, cache
            return
        width = max(self.ids.shape[1], ids.shape[1])
        self.ids = torch.cat([_pad_left(self.ids, width, 1, self.pad_id), _pad_left(ids, width, 1, self.pad_id)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        if cache is not None:
            for layer, (keys, values, _) in zip(self.cache.layers, cache):
                layer.add_rows(keys, values)
        self.rows += rows

    def _keep(self, indices: list[int]) -> None:
        """Keep only rows `indices` (the last rows move into the places of those that leave), then drop the
        leading columns that are padding in every kept row."""
        if not indices:
            self._clear()
            return
        count, kept = len(indices), set(indices)
        holes = [i for i in range(count) if i not in kept]
        movers = [i for i in indices if i >= count]
        order = list(range(count))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        self.rows = [self.rows[i] for i in order]
        index = torch.tensor(order, dtype=torch.long, device=self.device)
        self.mask, self.ids = self.mask[index], self.ids[index]
        start = int(self.mask.any(dim=0).long().argmax())  # rows are contiguous runs that end at the last column
        self.mask, self.ids = self.mask[:, start:], self.ids[:, start:]
        if self.cache is not None:
            to, source = (torch.tensor(rows, dtype=torch.long, device=self.device) for rows in (holes, movers))
            for layer in self.cache.layers:
                layer.keep_rows(to, source, count, drop_leading=start)
