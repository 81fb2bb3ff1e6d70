"""The running batch as a value: rows leave through `filter`, rows join through `concatenate` (as in TGI).

Rows are left-padded: every row's KV slots end at the same column, padding sits at the left, and the attention mask
marks which columns a row really holds (a prefix row's task prefix comes first). The engine owns the keys and values:
per layer one buffer with spare columns, so a decode step writes one column instead of copying the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.attention import StepKV
from server.engine.request import Sequence

MIN_SPARE = 32  # columns a new buffer holds beyond what is filled
SPARE_FRACTION = 0.25


@dataclass(slots=True)
class Batch:
    rows: list[Sequence]
    attention_mask: torch.Tensor  # [B, L]; 1 where the row holds a KV slot
    keys: list[torch.Tensor]  # per layer [B, kv_heads, capacity, head_dim]; columns past L are spare
    values: list[torch.Tensor]
    next_positions: torch.Tensor  # [B]; the position id of each row's next token

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def kv_len(self) -> int:
        return self.attention_mask.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def decode_kv(self) -> tuple[Batch, StepKV]:
        """The batch grown by one column per row, and the step that writes it (each row's next token)."""
        grown = self.with_room(self.kv_len + 1)
        mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((self.size, 1))], dim=1)  # [B, L + 1]
        grown.attention_mask, grown.next_positions = mask, self.next_positions + 1
        return grown, step_kv(grown.keys, grown.values, mask, self.kv_len, self.next_positions[:, None])

    def with_room(self, length: int) -> Batch:
        """This batch, or a copy into larger buffers when `length` columns would not fit."""
        if length <= self.capacity:
            return Batch(self.rows, self.attention_mask, self.keys, self.values, self.next_positions)
        capacity = with_spare(length)
        keys = [copy_columns(k, k.new_zeros(resized(k, capacity)), 0, self.kv_len) for k in self.keys]
        values = [copy_columns(v, v.new_zeros(resized(v, capacity)), 0, self.kv_len) for v in self.values]
        return Batch(self.rows, self.attention_mask, keys, values, self.next_positions)

    def filter(self, keep: list[int]) -> Batch:
        """The batch with only rows `keep` (in order), without the columns no remaining row uses."""
        index = torch.tensor(keep, dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask.index_select(0, index)
        start = first_used_column(mask)
        return Batch(
            rows=[self.rows[i] for i in keep],
            attention_mask=mask[:, start:],
            keys=[select_rows(k, index, start, self.kv_len) for k in self.keys],
            values=[select_rows(v, index, start, self.kv_len) for v in self.values],
            next_positions=self.next_positions.index_select(0, index),
        )

    @staticmethod
    def concatenate(*batches: Batch) -> Batch:
        """One batch holding them all, in order: each is left-padded to the longest KV length."""
        if len(batches) == 1:
            return batches[0]
        length = max(batch.kv_len for batch in batches)
        layers = range(len(batches[0].keys))
        return Batch(
            rows=[row for batch in batches for row in batch.rows],
            attention_mask=torch.cat([left_pad(batch.attention_mask, length) for batch in batches]),
            keys=[stack_right_aligned([(b.keys[i], b.kv_len) for b in batches], length) for i in layers],
            values=[stack_right_aligned([(b.values[i], b.kv_len) for b in batches], length) for i in layers],
            next_positions=torch.cat([batch.next_positions for batch in batches]),
        )


def step_kv(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    attention_mask: torch.Tensor,
    start: int,
    query_positions: torch.Tensor,
) -> StepKV:
    """A forward pass that writes columns `start:` of `attention_mask` [B, end] (which covers them already)."""
    return StepKV(
        keys,
        values,
        start,
        key_positions=attention_mask.cumsum(-1) - 1,
        key_valid=attention_mask.bool(),
        query_positions=query_positions,
    )


def new_kv(like: torch.Tensor, num_rows: int, num_kv_heads: int, length: int, head_dim: int) -> torch.Tensor:
    """A zeroed buffer for `length` columns and spare room; zeros, because a padding column must hold finite values
    (a masked column's weight is zero, and zero times NaN is NaN)."""
    return like.new_zeros((num_rows, num_kv_heads, with_spare(length), head_dim))


def with_spare(length: int) -> int:
    return length + max(MIN_SPARE, int(length * SPARE_FRACTION))


def resized(kv: torch.Tensor, capacity: int) -> tuple[int, int, int, int]:
    rows, heads, _, head_dim = kv.shape
    return rows, heads, capacity, head_dim


def copy_columns(source: torch.Tensor, target: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Columns start:end of `source` into the first columns of `target`."""
    target[:, :, : end - start] = source[:, :, start:end]
    return target


def first_used_column(attention_mask: torch.Tensor) -> int:
    """Leading columns that are padding in every row can be dropped."""
    used = attention_mask.any(dim=0).nonzero()
    return int(used[0]) if used.numel() else attention_mask.shape[1]


def select_rows(kv: torch.Tensor, index: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows `index`, columns start:end, in a new buffer with spare room: [B', kv_heads, capacity', head_dim]."""
    rows = kv[:, :, start:end].index_select(0, index)
    return copy_columns(rows, rows.new_zeros(resized(rows, with_spare(end - start))), 0, end - start)


def stack_right_aligned(parts: list[tuple[torch.Tensor, int]], length: int) -> torch.Tensor:
    """Buffers holding `filled` columns each, stacked by row, their filled columns ending at column `length`."""
    first = parts[0][0]
    num_rows = sum(kv.shape[0] for kv, _ in parts)
    out = first.new_zeros((num_rows, first.shape[1], with_spare(length), first.shape[3]))
    row = 0
    for kv, filled in parts:
        out[row : row + kv.shape[0], :, length - filled : length] = kv[:, :, :filled]
        row += kv.shape[0]
    return out  # [B1 + B2 + ..., kv_heads, capacity, head_dim]


def left_pad(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad a [B, L] mask on the left to `length` columns."""
    return torch.nn.functional.pad(mask, (length - mask.shape[1], 0))
