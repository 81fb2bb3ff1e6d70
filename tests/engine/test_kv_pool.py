"""The pool's slot tables: each row's blocks' slots in order, ragged rows padded with block 0's."""

from __future__ import annotations

import torch

from server.engine.kv_pool import block_slots


def slots_by_hand(block_ids: list[int], width: int, block_size: int) -> list[int]:
    padded = block_ids + [0] * (width - len(block_ids))
    return [block * block_size + k for block in padded for k in range(block_size)]


def test_block_slots_lays_out_ragged_rows_in_order_padded_with_block_zero():
    rows = [[5, 2, 9], [], [7], [3, 1, 4, 8]]
    table = block_slots(rows, block_size=4)
    assert table.shape == (4, 16) and table.dtype == torch.long
    assert table.tolist() == [slots_by_hand(ids, 4, 4) for ids in rows]


def test_block_slots_of_rows_without_blocks_is_one_padding_block_wide():
    assert block_slots([[], []], block_size=8).tolist() == [list(range(8))] * 2
