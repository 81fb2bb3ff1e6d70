"""The running batch as a value: rows leave through `filter`, rows join through `concatenate` (as in TGI).

Rows are left-padded: every row's KV slots end at the same column, padding sits at the left, and the
attention mask marks which columns a row really holds (a prefix row's task prefix comes first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import DynamicCache

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
    return DynamicCache(ddp_cache_data=list(zip(keys, values, strict=True))) if keys else DynamicCache()


def cache_keys(cache: DynamicCache) -> list[torch.Tensor]:
    return [cast(Any, layer).keys for layer in cache.layers]  # DynamicLayer: [B, kv_heads, L, head_dim]


def cache_values(cache: DynamicCache) -> list[torch.Tensor]:
    return [cast(Any, layer).values for layer in cache.layers]
