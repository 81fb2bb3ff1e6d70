"""The batch's own KV buffers: decode steps write into spare columns, grow by copying only when full, and rows
joining or leaving keep exactly their filled columns, right-aligned."""

from __future__ import annotations

from typing import Any, cast

import torch

from server.engine.batch import MIN_SPARE, Batch, new_kv


def batch_of(lengths: list[int], seed: int) -> Batch:
    """A one-layer batch whose row b holds lengths[b] random columns, right-aligned (its own row index as rows)."""
    length = max(lengths)
    mask = torch.zeros((len(lengths), length), dtype=torch.long)
    keys = new_kv(torch.empty(()), len(lengths), 2, length, 4)
    generator = torch.Generator().manual_seed(seed)
    for b, n in enumerate(lengths):
        mask[b, length - n :] = 1
        keys[b, :, length - n : length] = torch.randn((2, n, 4), generator=generator)
    rows = cast(Any, list(range(len(lengths))))
    return Batch(rows, mask, [keys], [keys * 2], next_positions=mask.sum(-1))


def filled(batch: Batch, row: int) -> torch.Tensor:
    columns = batch.attention_mask[row].bool()
    return batch.keys[0][row, :, : batch.kv_len][:, columns]  # [kv_heads, n, head_dim]


def test_decode_writes_into_spare_columns_until_full_then_grows_keeping_everything():
    batch = batch_of([3, 5], seed=0)
    buffer, capacity = batch.keys[0], batch.capacity
    assert capacity == 5 + MIN_SPARE
    while batch.kv_len < capacity:
        batch, kv = batch.decode_kv()
        kv.write(0, torch.ones((2, 2, 1, 4)), torch.ones((2, 2, 1, 4)))
    assert batch.keys[0] is buffer  # filled to capacity without a copy
    grown, _ = batch.decode_kv()
    assert grown.keys[0] is not buffer and grown.capacity > capacity
    assert torch.equal(grown.keys[0][:, :, :capacity], batch.keys[0][:, :, :capacity])
    assert torch.equal(grown.values[0][:, :, :capacity], batch.values[0][:, :, :capacity])


def test_filter_and_concatenate_keep_each_rows_columns():
    first, second = batch_of([2, 6, 4], seed=1), batch_of([9], seed=2)
    expected = [filled(first, 0), filled(first, 2), filled(second, 0)]
    joined = Batch.concatenate(first.filter([0, 2]), second)
    assert joined.kv_len == 9 and joined.size == 3
    assert all(torch.equal(filled(joined, row), expected[row]) for row in range(3))
    assert torch.equal(joined.values[0][:, :, : joined.kv_len], joined.keys[0][:, :, : joined.kv_len] * 2)
    assert joined.next_positions.tolist() == [2, 4, 9]


def test_filter_drops_columns_no_remaining_row_uses():
    batch = batch_of([2, 7], seed=3).filter([0])
    assert batch.kv_len == 2 and torch.equal(batch.attention_mask, torch.ones((1, 2), dtype=torch.long))
