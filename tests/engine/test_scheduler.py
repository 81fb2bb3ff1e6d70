"""The scheduler and the KV memory are plain Python: tested with real requests and block counts, no model."""

from __future__ import annotations

from typing import Any, cast

import pytest

from prompt_store.types import Method, TaskArtifact, TaskRecord
from server.engine.kv_memory import KVMemory
from server.engine.request import Request, Sequence, Status
from server.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from server.engine.types import EnsembleMode, FinishReason, SamplingParams


def task(task_id: str, num_virtual: int = 8, version: int = 1) -> TaskArtifact:
    record = TaskRecord(task_id, version, Method.PREFIX_TUNING, num_virtual, 0, "", "")
    return TaskArtifact(record, {}, cast(Any, None))


def request(
    name: str, num_input: int = 10, max_new: int = 5, tasks: tuple[TaskArtifact | None, ...] = (None,), **kw: Any
) -> Request:
    made = Request(name, list(range(num_input)), SamplingParams(), max_new, sink=lambda output: None, **kw)
    made.rows = [Sequence(made, t, i, has_kv_prefix=t is not None) for i, t in enumerate(tasks)]
    return made


def scheduler(
    max_batch_size: int = 8, max_step_tokens: int = 64, max_waiting: int = 8, num_blocks: int = 64, block_size: int = 4
) -> Scheduler:
    config = SchedulerConfig(max_batch_size, max_step_tokens, max_waiting)
    return Scheduler(config, KVMemory(num_blocks, block_size))


def sample(plan: StepPlan) -> None:
    """What the engine does after the forward pass: computed tokens advance, rows at their last token get one."""
    for chunk in plan.chunks:
        is_last = chunk.is_last
        chunk.row.num_computed += chunk.num_tokens
        if is_last:
            chunk.row.output_ids.append(7)


def chunk_sizes(plan: StepPlan) -> dict[str, list[int]]:
    sizes: dict[str, list[int]] = {}
    for chunk in plan.chunks:
        sizes.setdefault(chunk.row.request.request_id, []).append(chunk.num_tokens)
    return sizes


def test_admits_in_arrival_order_and_prefills_whole_inputs_within_the_budget():
    s = scheduler()
    first, second = request("first"), request("second", num_input=20)
    s.add(first)
    s.add(second)
    plan = s.schedule()
    assert plan.admitted == [first, second] and chunk_sizes(plan) == {"first": [10], "second": [20]}
    assert all(chunk.is_last for chunk in plan.chunks)
    assert len(first.rows[0].block_ids) == 3 and len(second.rows[0].block_ids) == 5  # blocks of 4


def test_a_long_input_is_split_across_steps_while_running_rows_decode():
    s = scheduler(max_step_tokens=16)
    running = request("running", num_input=4)
    s.add(running)
    sample(s.schedule())
    long = request("long", num_input=40)
    s.add(long)
    steps = []
    while long.rows[0].num_remaining > 1 or not long.rows[0].output_ids:
        plan = s.schedule()
        steps.append(chunk_sizes(plan))
        sample(plan)
    assert steps[0] == {"running": [1], "long": [15]}  # the running row's token first, then the chunk
    assert [step["long"][0] for step in steps] == [15, 15, 10]
    assert all(step.get("running") == [1] for step in steps)


def test_never_skips_the_head_of_the_queue_for_a_smaller_request():
    s = scheduler(num_blocks=10)
    s.add(request("running", num_input=20))  # 5 blocks
    sample(s.schedule())
    big, small = request("big", num_input=24), request("small", num_input=4)
    s.add(big)
    s.add(small)
    assert s.schedule().admitted == []  # `small` would fit, but it must not starve `big`
    s.remove(s.running[0])
    assert s.schedule().admitted == [big, small]


def test_rows_count_against_max_batch_size():
    s = scheduler(max_batch_size=4)
    s.add(request("single"))
    s.add(request("ensemble", tasks=(None,) * 4, ensemble=EnsembleMode.VOTE))
    assert [r.request_id for r in s.schedule().admitted] == ["single"]
    assert s.num_running_rows == 1


def test_mean_ensemble_rows_reach_their_last_token_in_the_same_step():
    s = scheduler(max_step_tokens=20)
    lockstep = request("mean", num_input=12, tasks=(task("a"), task("b")), ensemble=EnsembleMode.MEAN)
    s.add(lockstep)
    plan = s.schedule()
    assert chunk_sizes(plan) == {"mean": [11, 9]} and not any(chunk.is_last for chunk in plan.chunks)
    sample(plan)
    plan = s.schedule()
    assert chunk_sizes(plan) == {"mean": [1, 3]} and all(chunk.is_last for chunk in plan.chunks)


def test_memory_pressure_preempts_the_newest_request_and_resumes_it_from_its_tokens():
    s = scheduler(num_blocks=6)  # 24 slots
    old, new = request("old", num_input=8, max_new=8), request("new", num_input=8, max_new=8)
    s.add(old)
    s.add(new)
    sample(s.schedule())  # 2 blocks each, 2 free
    plans = []
    while not plans or not plans[-1].preempted:  # each row takes a third block; then a fourth does not fit
        plans.append(s.schedule())
        sample(plans[-1])
    plan = plans[-1]
    assert len(plans) == 5 and plan.preempted == [new] and chunk_sizes(plan) == {"old": [1]}
    assert new.status is Status.WAITING and s.waiting[0] is new
    assert new.rows[0].block_ids == [] and new.rows[0].num_computed == 0 and new.rows[0].output_ids  # tokens kept
    s.remove(old)
    plan = s.schedule()
    assert plan.admitted == [new] and chunk_sizes(plan) == {"new": [new.rows[0].num_own_tokens]}


def test_task_blocks_are_held_once_for_every_row_of_the_task_and_freed_by_retire():
    s = scheduler()
    shared = task("shared", num_virtual=10)  # 3 blocks
    rows = [request(f"r{i}", num_input=4, tasks=(shared,)) for i in range(5)]
    for r in rows:
        s.add(r)
    s.schedule()
    (held,) = s.memory.tasks.values()
    assert held.ref_count == 5 and len(held.block_ids) == 3
    assert s.memory.num_free_blocks == 64 - 3 - 5  # the task's blocks once, one own block per row
    s.memory.retire("shared", None)
    assert held.is_retired and "shared" in {key[0] for key in s.memory.tasks}  # in use: kept
    for r in rows:
        s.remove(r)
    assert not s.memory.tasks and s.memory.num_free_blocks == 64


def test_unused_task_blocks_stay_resident_and_are_evicted_least_recently_used_first():
    memory = KVMemory(num_blocks=6, block_size=4)
    for name in ("a", "b"):
        memory.hold_task((name, 1), 8)
        memory.release_task((name, 1))
    memory.hold_task(("a", 1), 8)  # a is used again: b is now the least recently used
    memory.release_task(("a", 1))
    assert memory.num_free_blocks == 2 and memory.num_available_blocks == 6
    memory.allocate(4)
    assert list(memory.tasks) == [("a", 1)] and memory.num_evictions == 1


def test_tasks_in_use_are_never_evicted():
    memory = KVMemory(num_blocks=4, block_size=4)
    memory.hold_task(("busy", 1), 8)
    assert memory.num_available_blocks == 2
    with pytest.raises(MemoryError):
        memory.allocate(3)


def test_releasing_a_task_not_held_raises():
    memory = KVMemory(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="expected a reference"):
        memory.release_task(("nobody", 1))


def test_why_never_fits_names_the_limit():
    s = scheduler(max_batch_size=2, num_blocks=8)
    assert "max_batch_size is 2" in s.why_never_fits(request("wide", tasks=(None,) * 3))
    assert "the KV cache holds 32" in s.why_never_fits(request("long", num_input=30, max_new=3))
    assert s.why_never_fits(request("fits", num_input=29, max_new=3)) is None


def test_is_full_at_max_waiting_and_add_refuses_then():
    s = scheduler(max_waiting=1)
    s.add(request("a"))
    assert s.is_full()
    with pytest.raises(AssertionError):
        s.add(request("b"))


def test_remove_and_find_cover_waiting_and_running_and_free_everything():
    s = scheduler(max_batch_size=1)
    first, second = request("first", tasks=(task("t"),)), request("second")
    s.add(first)
    s.add(second)
    s.schedule()
    assert s.find("first") is first and s.find("second") is second
    s.remove(second)
    s.remove(first)
    assert s.find("first") is None and not s.has_work()
    assert s.memory.num_available_blocks == s.memory.num_blocks and s.memory.num_task_refs() == 0


def test_why_never_fits_counts_tasks_in_full_even_when_resident_and_in_use():
    s = scheduler(num_blocks=10)
    shared = task("shared", num_virtual=4)  # 1 block
    s.add(request("running", num_input=4, tasks=(shared,)))
    s.schedule()
    # 1 task block + 40 own tokens (10 blocks) > 10 blocks, whether or not the task is resident now
    assert "the KV cache holds 40" in s.why_never_fits(request("big", num_input=30, max_new=10, tasks=(shared,)))


def test_block_0_is_never_handed_out():
    memory = KVMemory(num_blocks=4, block_size=4)
    assert sorted(memory.allocate(4)) == [1, 2, 3, 4] and memory.num_free_blocks == 0


def test_finished_rows_do_not_take_their_task_back_when_their_request_resumes():
    s = scheduler()
    vote = request("vote", num_input=4, tasks=(task("a"), task("b")), ensemble=EnsembleMode.VOTE)
    s.add(vote)
    sample(s.schedule())
    vote.rows[0].finish_reason = FinishReason.EOS
    s.free_row(vote.rows[0])
    s.preempt(vote, StepPlan())
    plan = s.schedule()
    assert plan.admitted == [vote] and [c.row for c in plan.chunks] == [vote.rows[1]]
    assert vote.rows[0].task_blocks is None and s.memory.num_task_refs() == 1


def test_a_version_retired_before_its_request_arrives_is_freed_on_its_last_release():
    memory = KVMemory(num_blocks=8, block_size=4)
    memory.retire("t", keep_version=2)  # v2 registered; a request built against v1 is still on its way
    memory.hold_task(("t", 1), 4)
    memory.release_task(("t", 1))
    assert not memory.tasks and memory.num_free_blocks == 8


def plan_summary(plan: StepPlan) -> list[tuple[str, int, int, int, list[int]]]:
    return [(c.row.request.request_id, c.row.index, c.start, c.num_tokens, list(c.row.block_ids)) for c in plan.chunks]


@pytest.mark.parametrize("num_blocks", [64, 14])
def test_decode_rows_scheduled_at_once_plan_as_request_by_request(num_blocks, monkeypatch):
    """The decoding requests' rows in one go (the usual step) make the plan the loop over requests makes: the same
    chunks, blocks, admissions and preemptions (14 blocks: memory runs short and the newest are preempted)."""

    def arrivals() -> list[Request]:
        return [
            request("a", num_input=6, max_new=9),
            request("b", num_input=3, max_new=12, ensemble=EnsembleMode.MEAN, tasks=(None, None)),
            request("c", num_input=9, max_new=7, tasks=(task("t"),)),
            request("d", num_input=2, max_new=10, ensemble=EnsembleMode.VOTE, tasks=(None, None, None)),
        ]

    def run(at_once: bool) -> list[Any]:
        s = scheduler(max_step_tokens=12, num_blocks=num_blocks)
        at_once_steps.append(0)
        decode_all = s.schedule_decoding

        def counted(decoding: Any, plan: StepPlan) -> bool:
            done = at_once and decode_all(decoding, plan)
            at_once_steps[-1] += done
            return done

        monkeypatch.setattr(s, "schedule_decoding", counted)
        waiting, plans = arrivals(), []
        for step in range(24):
            if step % 3 == 0 and waiting:
                s.add(waiting.pop(0))
            plan = s.schedule()
            plans.append((plan_summary(plan), [r.request_id for r in plan.admitted],
                          [r.request_id for r in plan.preempted]))  # fmt: skip
            sample(plan)
            for request_ in list(s.running):
                for row in request_.rows:
                    if len(row.output_ids) >= request_.max_new_tokens and not row.is_finished:
                        row.finish_reason = FinishReason.LENGTH
                        s.free_row(row)
                if request_.is_finished:
                    s.remove(request_)
        return plans

    at_once_steps: list[int] = []
    at_once, each = run(True), run(False)
    assert at_once == each
    assert at_once_steps[0] >= 10 and at_once_steps[1] == 0  # most steps took the one go
    assert any(preempted for _, _, preempted in each) == (num_blocks == 14)
