"""The running rows' key slots, kept from step to step (as vLLM keeps its block table in a persistent batch): a row's
slots are written when it first runs and as its blocks grow, so a step's key slots [R, L] are one `index_select` of
the kept rows, not a rebuild from every row's block list.

A row's keys, in position order, are its task's shared prefix (P tokens) and then its own tokens; its table row holds
their slots: columns 0..P-1 the prefix's, then its own blocks' (block_size a block). The rows' block lists stay the
scheduler's (one owner); the table is the step's copy of them on the host, checked for every row every step: a row
whose block list is another list (freed by a preemption, then allocated again) or whose prefix is another task's
blocks is written anew; one whose list grew gets the new blocks' slots. A step of the same rows as the step before
(the usual decode step) reads them through the index it kept, and only rows whose blocks changed are visited.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.kv_memory import TaskBlocks
from server.engine.kv_pool import HOST, long_tensor
from server.engine.request import Sequence


@dataclass(slots=True)
class Kept:
    """What a row's table row was written from."""

    row: Sequence  # held, so that no other row can take its id while it is kept
    index: int  # its row of the table
    blocks: list[int]  # the row's block list (the same list while the row keeps its blocks; it only grows)
    num_blocks: int  # how many of them the table row holds
    prefix: TaskBlocks | None
    num_prefix: int  # the prefix's slots: the columns before its own


class SlotTable:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.table = torch.zeros((0, block_size), dtype=torch.long, device=HOST)  # [capacity rows, columns]
        self.offsets = torch.arange(block_size, device=HOST)  # a block's slots after its first
        self.kept: dict[int, Kept] = {}  # by id(row)
        self.free: list[int] = []  # table rows no row holds
        self.last_rows: list[Sequence] = []  # the last call's rows, in order,
        self.last_kept: list[Kept] = []  # what the table keeps of each of them,
        self.last_index = torch.empty(0, dtype=torch.long, device=HOST)  # and their table rows

    def key_slots(self, rows: list[Sequence], width: int) -> torch.Tensor:
        """[R, width]: these rows' key slots, prefix then own (past a row's blocks, zeros or stale slots: the caller
        reads a row's keys up to its length only). Rows kept before and not among these are dropped."""
        placed: list[tuple[int, int, int]] = []  # (table row, column, block id) of blocks new to the table
        if rows == self.last_rows:  # by identity (eq=False): the same rows in the same order, none dropped
            for row, kept in zip(rows, self.last_kept, strict=True):
                changed = kept.blocks is not row.block_ids or kept.prefix is not row.task_blocks
                if changed or kept.num_blocks != len(row.block_ids):
                    self.index_of(row, placed)  # its table row stays the same
        else:
            for gone in self.kept.keys() - {id(row) for row in rows}:
                self.free.append(self.kept.pop(gone).index)
            indices = [self.index_of(row, placed) for row in rows]
            self.last_rows, self.last_kept = list(rows), [self.kept[id(row)] for row in rows]
            self.last_index = long_tensor(indices)
        self.place(placed, width)
        return self.table[:, :width].index_select(0, self.last_index)

    def index_of(self, row: Sequence, placed: list[tuple[int, int, int]]) -> int:
        """The row's table row; the blocks it lacks (all of them, for a row new to the table) go to `placed`."""
        kept = self.kept.get(id(row))
        if kept is None:
            index = self.free.pop() if self.free else self.grow()
            kept = self.kept[id(row)] = Kept(row, index, row.block_ids, 0, row.task_blocks, row.num_prefix_tokens)
            placed += self.prefix_blocks(kept)
        elif kept.blocks is not row.block_ids or kept.prefix is not row.task_blocks:  # written anew, in its place
            kept.blocks, kept.num_blocks = row.block_ids, 0
            kept.prefix, kept.num_prefix = row.task_blocks, row.num_prefix_tokens
            placed += self.prefix_blocks(kept)
        if len(row.block_ids) != kept.num_blocks:
            first = kept.num_prefix + kept.num_blocks * self.block_size
            new = row.block_ids[kept.num_blocks :]
            placed += [(kept.index, first + i * self.block_size, block) for i, block in enumerate(new)]
            kept.num_blocks = len(row.block_ids)
        return kept.index

    def prefix_blocks(self, kept: Kept) -> list[tuple[int, int, int]]:
        """(table row, column, block id) of the kept row's prefix blocks."""
        prefix = kept.prefix.block_ids if kept.prefix is not None else []
        return [(kept.index, i * self.block_size, block) for i, block in enumerate(prefix)]

    def place(self, placed: list[tuple[int, int, int]], width: int) -> None:
        """Each block's slots into its table row from its column on, all in one write (the table widened first to
        hold them and `width` columns)."""
        if not placed:
            if width > self.table.shape[1]:
                self.widen(width)
            return
        size = self.block_size
        self.widen(max(width, max(column for _, column, _ in placed) + size))
        stride = self.table.shape[1]
        firsts = long_tensor([index * stride + column for index, column, _ in placed])  # [K]: each block's first
        slots = long_tensor([block * size for _, _, block in placed])  # [K]: its first slot
        self.table.view(-1)[(firsts[:, None] + self.offsets).flatten()] = (slots[:, None] + self.offsets).flatten()

    def grow(self) -> int:
        """A new table row (the table doubles when full); its index."""
        used = len(self.kept) + len(self.free)
        if used == self.table.shape[0]:
            wider = torch.zeros((max(8, 2 * used), self.table.shape[1]), dtype=torch.long, device=HOST)
            wider[:used] = self.table
            self.table = wider
        self.free.extend(range(self.table.shape[0] - 1, used, -1))  # every new row but the one returned
        return used

    def widen(self, width: int) -> None:
        """Room for `width` columns (doubling, so a growing row widens the table rarely)."""
        if width <= self.table.shape[1]:
            return
        wider = torch.zeros((self.table.shape[0], max(width, 2 * self.table.shape[1])), dtype=torch.long, device=HOST)
        wider[:, : self.table.shape[1]] = self.table
        self.table = wider
