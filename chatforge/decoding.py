"""Decoding many sequences together: the per-row sampler and the batch that chat, evaluate and serve share.

A `DecodingBatch` holds rows over one left-padded KV cache (a transformers `DynamicCache` whose
[batch, heads, length, dim] tensors we pad, join and index on the batch axis; its layers keep room to grow, so a
decode step writes its token in place rather than copying the whole cache). Rows join between steps, their
prompts prefilled together in one forward pass, and leave the moment they finish; one `step` feeds every row
its last token. A static batch
(evaluate, `generation.sample_tokens`) is the case where nobody joins later; `chatforge serve` admits new
requests between steps (continuous batching).

Every row carries its own sampling parameters and its own random generator, so a row's tokens depend only on
its logits, never on the other rows: a greedy or seeded row draws what it would draw alone, as long as its
logits agree with the lone run's (batched fp32 matmuls may round the last bits differently; docs/serving.md).
Position ids count each row's real tokens, so left padding changes no position.

Rows that join a running batch (`step(joining=...)`) are prefilled in the running rows' decode step rather than
in a pass of their own, as vLLM's chunked prefill: the step's tokens (one per running row, every joining prompt's
tokens) are packed into one sequence, so the projections and the MLP run once over exactly those tokens, and
`PACKED_ATTENTION` splits attention into the running rows' one-token decode over the cache and the joining
rows' causal prefill. On CPU a forward pass has a fixed cost of a few milliseconds whatever its size, and a
separate prefill pass per admission was a third of the engine's time under load.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from chatforge.errors import ChatforgeError

if TYPE_CHECKING:
    from chatforge.generation import SamplingParams

GREEDY_BELOW = 1e-5  # temperatures this low decode greedily: dividing logits by them overflows fp32 (as vLLM)


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
    sampling: "SamplingParams"
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


# ------------------------------------------------------------------------------------------- sampler


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


# ---------------------------------------------------------------------------------------- packed step

PACKED_ATTENTION = "chatforge_packed"  # transformers' SDPA attention, unless a forward pass passes `packing`


@dataclass
class Packing:
    """How a packed step's tokens split: the first `running` are the running rows' last tokens (one each, over
    `cache`, seen through `running_mask` [rows, 1, 1, length]); the rest are the joining rows' own prompt tokens,
    which `own_index` places into a left-padded [joining x width] rectangle seen through `joining_mask`
    [joining, 1, width, prefix + width], after the `prefix` keys and values of each layer (or none)."""

    cache: DynamicCache
    running: int
    running_mask: torch.Tensor
    own_index: torch.Tensor
    joining: int
    width: int
    joining_mask: torch.Tensor
    prefix: DynamicCache | None

    def attend(self, module, query, key, value, **kwargs):
        """Attention output [1, tokens, heads, dim] of the packed `query`/`key`/`value` [1, heads, tokens, dim]; the
        running rows' new keys and values are written to the cache and the joining rows' are added below them."""
        layer = self.cache.layers[module.layer_idx]
        one_per_row = [tensor[0, :, : self.running].transpose(0, 1)[:, :, None] for tensor in (query, key, value)]
        keys, values = layer.update(one_per_row[1], one_per_row[2])
        decoded, _ = sdpa_attention_forward(module, one_per_row[0], keys, values, self.running_mask, **kwargs)
        query, key, value = (self._rectangle(tensor[0, :, self.running :]) for tensor in (query, key, value))
        if self.prefix is not None:
            prefix = self.prefix.layers[module.layer_idx]
            key = torch.cat([prefix.keys.expand(self.joining, -1, -1, -1), key], dim=2)
            value = torch.cat([prefix.values.expand(self.joining, -1, -1, -1), value], dim=2)
        prefilled, _ = sdpa_attention_forward(module, query, key, value, self.joining_mask, **kwargs)
        layer.add_rows(key, value)
        prefilled = prefilled.reshape(-1, *prefilled.shape[2:])[self.own_index]
        return torch.cat([decoded[:, 0], prefilled])[None], None

    def _rectangle(self, packed: torch.Tensor) -> torch.Tensor:
        """[heads, own tokens, dim] → [joining, heads, width, dim], left-padded with zeros."""
        heads, _, dim = packed.shape
        rectangle = packed.new_zeros((self.joining * self.width, heads, dim))
        rectangle[self.own_index] = packed.transpose(0, 1)
        return rectangle.view(self.joining, self.width, heads, dim).transpose(1, 2)


def _packed_attention(module, query, key, value, attention_mask, packing: Packing | None = None, **kwargs):
    if packing is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return packing.attend(module, query, key, value, **kwargs)


AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


# ----------------------------------------------------------------------------------------- the batch


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views `buffer[:rows, :, start:end]` into buffers with spare rows and
    length (doubled when outgrown), so that the batch changes in place.

    DynamicLayer concatenates every step, copying the whole cache per layer: on CPU that was a third of a 20-row
    decode step's time, and selecting the rows that stay or joining new ones copied it again. Here a step writes
    its column in place, a row leaving is replaced by the last row and leading padding columns are dropped by
    moving `start` (`keep_rows`), and joining rows are written below the others (`add_rows`): each copies only the
    rows it moves. Anything that replaces `keys` from outside (transformers' batch_select_indices,
    crop) is seen at the next call, which adopts the new tensors into fresh buffers."""

    _keys = _values = _view = None  # the buffers, and the view last handed out as `keys`
    _rows = _start = _end = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._own()
        rows, added, length = key_states.shape[0], key_states.shape[-2], self._end - self._start
        if self._keys is None or self._end + added > self._keys.shape[-2]:
            self._reallocate(rows, max(length + added, 2 * length), like=key_states)
        self._keys[:rows, :, self._end : self._end + added] = key_states
        self._values[:rows, :, self._end : self._end + added] = value_states
        self._rows, self._end = rows, self._end + added
        return self._publish()

    def keep_rows(self, holes: torch.Tensor, movers: torch.Tensor, count: int, drop_leading: int) -> None:
        """Rows `movers` move into rows `holes` (rows that left), the first `count` rows stay, and their first
        `drop_leading` positions (padding in every row) are forgotten."""
        self._own()
        if len(holes):
            for buffer in (self._keys, self._values):
                buffer[holes, :, self._start : self._end] = buffer[movers, :, self._start : self._end]
        self._rows = count
        self._start += drop_leading
        self._publish()

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Rows of (keys, values) [rows, heads, length, dim] joined below the others, right-aligned with them; the
        shorter side is zero-padded on the left (the attention mask hides those positions)."""
        self._own()
        rows, width = self._rows + keys.shape[0], max(keys.shape[-2], self._end - self._start)
        if rows > self._keys.shape[0] or width > self._end - self._start:
            self._reallocate(max(rows, 2 * self._keys.shape[0]), 2 * width, like=keys, right_aligned_at=width)
        for buffer, new in ((self._keys, keys), (self._values, values)):
            buffer[self._rows : rows, :, self._start : self._end - new.shape[-2]] = 0
            buffer[self._rows : rows, :, self._end - new.shape[-2] : self._end] = new
        self._rows = rows
        self._publish()

    def _own(self) -> None:
        """Adopt keys and values set from outside into fresh buffers (nothing for the lazy initialization's empty
        ones)."""
        if self._view is not self.keys:
            keys, values = self.keys, self.values
            self._keys = self._values = None
            self._rows = self._start = self._end = 0
            if keys is not None and keys.dim() == 4:
                self._reallocate(keys.shape[0], keys.shape[-2], like=keys, source=(keys, values))
                self._publish()

    def _reallocate(self, rows: int, length: int, like: torch.Tensor, right_aligned_at: int | None = None,
                    source: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Zeroed buffers of `rows` x `length` that take the current rows (or `source`'s), ending at column
        `right_aligned_at` (default: starting at column 0)."""
        if source is None and self._keys is not None:
            visible = (slice(None, self._rows), slice(None), slice(self._start, self._end))
            source = self._keys[visible], self._values[visible]
        current = source[0].shape[-2] if source is not None else 0
        end = current if right_aligned_at is None else right_aligned_at
        shape = (rows, like.shape[1], length, like.shape[3])
        self._keys, self._values = like.new_zeros(shape), like.new_zeros(shape)
        if source is not None:
            self._rows = source[0].shape[0]
            self._keys[: self._rows, :, end - current : end] = source[0]
            self._values[: self._rows, :, end - current : end] = source[1]
        self._start, self._end = 0, end

    def _publish(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = self._keys[: self._rows, :, self._start : self._end]
        self.values = self._values[: self._rows, :, self._start : self._end]
        self._view = self.keys
        return self.keys, self.values


class GrowingCache(DynamicCache):
    """A DynamicCache of GrowingLayers, optionally filled with per-layer (keys, values)."""

    def __init__(self, pairs=()):
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)
        for keys, values in pairs:
            self.update(keys, values, len(self.layers))


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
                    f"{self.context - row.sampling.max_new_tokens} tokens (generation.fit_history)")

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
