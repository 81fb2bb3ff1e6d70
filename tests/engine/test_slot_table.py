"""The kept key-slot table: every step's rows read the slots their block lists say, through joins, growth,
preemptions and rows leaving, whatever the table kept from the steps before."""

from __future__ import annotations

import random

from server.engine.kv_memory import TaskBlocks
from server.engine.request import Request, Sequence
from server.engine.slot_table import SlotTable
from server.engine.types import SamplingParams
from tests.engine.test_scheduler import task

BLOCK_SIZE = 4


def row(num_virtual: int = 0) -> Sequence:
    """A plain row, or a prefix task's (its keys start with the task's shared blocks)."""
    request = Request("r", [1, 2, 3], SamplingParams(), 8, lambda output: None)
    made = Sequence(request, task("t", num_virtual) if num_virtual else None, has_kv_prefix=bool(num_virtual))
    if num_virtual:
        made.task_blocks = TaskBlocks(("t", num_virtual), num_virtual, [90 + num_virtual, 95 + num_virtual])
    request.rows = [made]
    return made


def by_hand(made: Sequence) -> list[int]:
    """The row's keys' slots in position order: its prefix's tokens, then every slot of its own blocks."""
    prefix = made.task_blocks.block_ids if made.task_blocks is not None else []
    prefix_slots = [b * BLOCK_SIZE + i for b in prefix for i in range(BLOCK_SIZE)][: made.num_prefix_tokens]
    return prefix_slots + [b * BLOCK_SIZE + i for b in made.block_ids for i in range(BLOCK_SIZE)]


def check(table: SlotTable, rows: list[Sequence]) -> None:
    expected = [by_hand(made) for made in rows]
    width = max(len(slots) for slots in expected)
    got = table.key_slots(rows, width).tolist()
    for slots, kept in zip(expected, got, strict=True):
        assert kept[: len(slots)] == slots


def test_rows_read_their_blocks_slots_through_growth_preemption_and_leaving():
    rng = random.Random(0)
    table, next_block = SlotTable(BLOCK_SIZE), iter(range(1, 10_000))
    running: list[Sequence] = []
    for _ in range(60):
        if rng.random() < 0.3 or not running:  # a row joins
            running.insert(rng.randrange(len(running) + 1), row(rng.choice([0, 0, 3, 6])))
        for made in running:
            if rng.random() < 0.3:  # its blocks grow in place, as the scheduler's `grow` does
                made.block_ids += [next(next_block) for _ in range(rng.randint(1, 2))]
        if rng.random() < 0.2:  # preempted: its blocks freed (a new list), allocated again when it resumes
            victim = rng.choice(running)
            victim.block_ids = [next(next_block) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.2 and len(running) > 1:  # a row leaves
            running.pop(rng.randrange(len(running)))
        step_rows = [made for made in running if made.block_ids]
        if step_rows:
            check(table, step_rows)
            assert len(table.kept) == len(step_rows)  # those that left the step are dropped


def test_a_left_rows_table_row_is_reused_by_the_next_row():
    table = SlotTable(BLOCK_SIZE)
    long, short = row(), row()
    long.block_ids = [7, 8, 9]
    check(table, [long])
    short.block_ids = [3]
    slots = table.key_slots([short], 3 * BLOCK_SIZE)  # as wide as the row before it held
    assert table.kept[id(short)].index == 0  # the same table row, freed when `long` left the step
    assert slots[0, :BLOCK_SIZE].tolist() == by_hand(short)


def test_the_same_rows_step_after_step_read_their_blocks_slots_through_growth_and_new_lists():
    """The usual decode step, the same rows as the step before, reads them through the kept index: rows whose blocks
    grew, whose block list is a new one (preempted and resumed) or whose prefix is held anew still read theirs."""
    rng = random.Random(1)
    table, next_block = SlotTable(BLOCK_SIZE), iter(range(1, 10_000))
    rows = [row(rng.choice([0, 3, 6])) for _ in range(12)]
    for made in rows:
        made.block_ids = [next(next_block)]
    for _ in range(40):
        for made in rows:
            if rng.random() < 0.3:
                made.block_ids += [next(next_block)]
        if rng.random() < 0.3:
            rng.choice(rows).block_ids = [next(next_block) for _ in range(rng.randint(1, 3))]
        prefixed = [made for made in rows if made.task_blocks is not None]
        if rng.random() < 0.3 and prefixed:
            made = rng.choice(prefixed)
            again = [next(next_block), next(next_block)]  # the task's blocks held anew (resumed after a preemption)
            made.task_blocks = TaskBlocks(made.task_blocks.key, made.num_prefix_tokens, again)
        check(table, rows)
