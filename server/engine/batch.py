"""The running batch as a value: rows leave through `filter`, rows join through `concatenate` (as in TGI).

Rows are left-padded: every row's KV slots end at the same column, padding sits at the left, and the
attention mask marks which columns a row really holds (a prefix row's task prefix comes first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from server.engine.request import Sequence


@dataclass(slots=True)
class Batch:
    rows: list[Sequence]
    attention_mask: torch.Tensor  # [B, L]; 1 where the row holds a KV slot
    cache: DynamicCache  # per layer keys and values [B, kv_heads, L, head_dim]; the model appends in place
    next_positions: torch.Tensor  # [B]; the position id of each row's next token

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def kv_len(self) -> int:
        return self.attention_mask.shape[1]

    @property
    def keys(self) -> list[torch.Tensor]:
        return cache_keys(self.cache)

    @property
    def values(self) -> list[torch.Tensor]:
        return cache_values(self.cache)

    def filter(self, keep: list[int]) -> Batch:
        """The batch with only rows `keep` (in order), without the columns no remaining row uses."""
        index = torch.tensor(keep, dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask.index_select(0, index)
        start = first_used_column(mask)
        return Batch(
            rows=[self.rows[i] for i in keep],
            attention_mask=mask[:, start:],
            cache=cache_from(
                [select_rows(k, index, start) for k in self.keys],
                [select_rows(v, index, start) for v in self.values],
            ),
            next_positions=self.next_positions.index_select(0, index),
        )

    @staticmethod
    def concatenate(*batches: Batch) -> Batch:
        """One batch holding them all, in order: each is left-padded to the longest KV length."""
        if len(batches) == 1:
            return batches[0]
        length = max(batch.kv_len for batch in batches)
        return Batch(
            rows=[row for batch in batches for row in batch.rows],
            attention_mask=stack_padded([batch.attention_mask for batch in batches], length),
            cache=cache_from(
                [stack_padded(list(layer), length) for layer in zip(*(batch.keys for batch in batches), strict=True)],
                [stack_padded(list(layer), length) for layer in zip(*(batch.values for batch in batches), strict=True)],
            ),
            next_positions=torch.cat([batch.next_positions for batch in batches]),
        )


def first_used_column(attention_mask: torch.Tensor) -> int:
    """Leading columns that are padding in every row can be dropped."""
    used = attention_mask.any(dim=0).nonzero()
    return int(used[0]) if used.numel() else attention_mask.shape[1]


def select_rows(kv: torch.Tensor, index: torch.Tensor, start: int) -> torch.Tensor:
    return kv.index_select(0, index)[:, :, start:].contiguous()  # [B', kv_heads, L', head_dim]


def stack_padded(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
    return torch.cat([left_pad(tensor, length) for tensor in tensors])  # [B1 + B2 + ..., ..., length, ...]


def left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad the sequence axis (dim 1 of a mask, dim 2 of a KV tensor) on the left to `length`."""
    seq_dim = 1 if tensor.dim() == 2 else 2
    missing = length - tensor.shape[seq_dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[seq_dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=seq_dim)


def cache_from(keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
    """A cache holding these per-layer tensors; an empty list gives an empty cache the model fills."""
    return GrowingCache(keys, values)


class GrowingCache(DynamicCache):
    """A DynamicCache whose layers append into spare capacity (GrowingLayer)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        if keys:
            layers: list[Any] = [GrowingLayer.holding(k, v) for k, v in zip(keys, values, strict=True)]
            Cache.__init__(self, layers=layers)
        else:
            Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes new keys and values into spare columns of a larger buffer.

    DynamicLayer concatenates, copying every key and value the batch holds at every decode step; here a step writes
    one column and `keys` / `values` are views of the buffer's filled part. When the buffer is full (or `keys` was
    replaced, e.g. by `crop`), a new one with room for `SPARE_FRACTION` more (at least `MIN_SPARE` columns) takes
    over.
    """

    MIN_SPARE = 32
    SPARE_FRACTION = 0.25

    key_buffer: torch.Tensor | None = None
    value_buffer: torch.Tensor | None = None

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> GrowingLayer:
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        return layer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self.has_room(end):
            self.grow(key_states, value_states, length, end)
        assert self.key_buffer is not None and self.value_buffer is not None
        self.key_buffer[:, :, length:end] = key_states
        self.value_buffer[:, :, length:end] = value_states
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def has_room(self, end: int) -> bool:
        buffer, keys = self.key_buffer, self.keys
        return (
            buffer is not None and keys is not None and end <= buffer.shape[2] and keys.data_ptr() == buffer.data_ptr()
        )

    def grow(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, end: int) -> None:
        capacity = end + max(self.MIN_SPARE, int(end * self.SPARE_FRACTION))
        self.key_buffer = new_buffer(key_states, capacity)
        self.value_buffer = new_buffer(value_states, capacity)
        if length and self.keys is not None and self.values is not None:
            self.key_buffer[:, :, :length] = self.keys
            self.value_buffer[:, :, :length] = self.values


def new_buffer(like: torch.Tensor, capacity: int) -> torch.Tensor:
    batch, heads, _, head_dim = like.shape
    return like.new_empty((batch, heads, capacity, head_dim))


def cache_keys(cache: DynamicCache) -> list[torch.Tensor]:
    return [cast(Any, layer).keys for layer in cache.layers]  # DynamicLayer: [B, kv_heads, L, head_dim]


def cache_values(cache: DynamicCache) -> list[torch.Tensor]:
    return [cast(Any, layer).values for layer in cache.layers]
