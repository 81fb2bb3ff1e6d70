"""Each step reports its per-task cache events (hits, loads with their time, evictions) and stats() where task
versions are held: what the per-task metrics are made of. Only users' tasks: the engine's own probes stay out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prompt_store.types import TaskKey
from server.engine.probe import Probe
from server.engine.types import StepStats, TaskCacheEvents
from tests.engine.harness import Harness
from tests.fixtures import TinyBackbone


def recording(tiny: TinyBackbone, store: Path, **config: Any) -> tuple[Harness, list[StepStats]]:
    harness = Harness(tiny, store, **config)
    steps: list[StepStats] = []
    harness.engine.step_listeners.append(steps.append)
    return harness, steps


def merged(steps: list[StepStats]) -> TaskCacheEvents:
    events = [step.cache_events for step in steps]
    return TaskCacheEvents(
        hits=tuple(key for e in events for key in e.hits),
        loads=tuple(load for e in events for load in e.loads),
        evictions=tuple(key for e in events for key in e.evictions),
    )


def loaded(events: TaskCacheEvents) -> list[TaskKey]:
    return [load.key for load in events.loads]


def test_first_use_is_a_timed_load_and_later_ones_hits(tiny_llama: TinyBackbone, tmp_path: Path) -> None:
    harness, steps = recording(tiny_llama, tmp_path / "store")
    harness.alone("hi", "prefix", max_new_tokens=2)
    harness.alone("hi", "prefix", max_new_tokens=2)
    events = merged(steps)
    assert loaded(events) == [("prefix", 1)] and events.loads[0].seconds > 0
    assert events.hits == (("prefix", 1),) and events.evictions == ()


def test_stats_list_the_versions_on_the_device_and_on_the_host(tiny_llama: TinyBackbone, tmp_path: Path) -> None:
    harness, _ = recording(tiny_llama, tmp_path / "store")
    harness.alone("hi", "prefix", max_new_tokens=2)
    assert harness.engine.tasks.stats().resident_tasks == (("prefix", 1),)
    assert ("prefix", 1) in harness.store.cached_keys() and ("prompt_tuning", 1) in harness.store.cached_keys()


def test_a_task_pushed_out_of_a_full_pool_is_an_eviction(tiny_llama: TinyBackbone, tmp_path: Path) -> None:
    # 3 blocks of 4 tokens: a row of "hello" (6 tokens with <s>) and 2 new ones takes 2, a 3-token task 1, so the
    # second task's row needs the first task's block
    harness, steps = recording(tiny_llama, tmp_path / "store", kv_cache_tokens=12, kv_block_size=4)
    harness.alone("hello", "prefix", max_new_tokens=2)
    harness.alone("hello", "p_tuning_lstm", max_new_tokens=2)
    events = merged(steps)
    assert events.evictions == (("prefix", 1),)
    assert harness.engine.tasks.stats().resident_tasks == (("p_tuning_lstm", 1),)


def test_embeddings_pushed_out_of_their_budget_are_an_eviction(tiny_llama: TinyBackbone, tmp_path: Path) -> None:
    harness, steps = recording(tiny_llama, tmp_path / "store", cache_prompt_kv=False, prompt_cache_bytes=1)
    harness.alone("hi", "prompt_tuning", max_new_tokens=2)
    harness.alone("hi", "p_tuning_mlp", max_new_tokens=2)
    events = merged(steps)
    assert loaded(events) == [("prompt_tuning", 1), ("p_tuning_mlp", 1)]
    assert events.evictions == (("prompt_tuning", 1),)
    assert harness.engine.tasks.stats().resident_tasks == (("p_tuning_mlp", 1),)


def test_probe_rows_leave_no_events_and_no_residency(tiny_llama: TinyBackbone, tmp_path: Path) -> None:
    harness, steps = recording(tiny_llama, tmp_path / "store")
    probe = Probe.of(harness.store.load("prefix"), harness.backbone, prompts_as_kv=True)
    for request in probe.requests:
        harness.engine.probe(request)
    while harness.engine.has_work():
        harness.engine.step()
    assert steps and all(step.cache_events == TaskCacheEvents() for step in steps)
    assert harness.engine.tasks.num_misses > 0  # the probe did load its task: the totals count it
    assert harness.engine.tasks.stats().resident_tasks == ()
