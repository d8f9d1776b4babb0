"""A packed step: rows that join a running batch prefilled in the running rows' decode step.

Rows that join a running batch (`batch.DecodingBatch.step(joining=...)`) are prefilled in the running rows' decode
step rather than in a pass of their own, as vLLM's chunked prefill: the step's tokens (one per running row, every
joining prompt's tokens) are packed into one sequence, so the projections and the MLP run once over exactly those
tokens, and `PACKED_ATTENTION` splits attention into the running rows' one-token decode over the cache and the
joining rows' causal prefill. On CPU a forward pass has a fixed cost of a few milliseconds whatever its size, and a
separate prefill pass per admission was a third of the engine's time under load.

Importing this module registers `PACKED_ATTENTION` with transformers' `AttentionInterface` and
`AttentionMaskInterface` (`batch` imports it, so a model a batch switches to it always finds it registered).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


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
