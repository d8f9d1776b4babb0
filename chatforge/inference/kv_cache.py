"""The KV cache of a decoding batch: transformers' `DynamicCache` whose layers grow, join and drop rows in place.

Built on transformers' DynamicCache internals (`DynamicLayer`'s `keys`/`values` and lazy initialization,
`Cache(layer_class_to_replicate=...)`).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


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
