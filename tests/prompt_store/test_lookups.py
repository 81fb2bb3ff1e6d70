"""No stale 404: an id unknown to a process is looked up in the shared store before TaskNotFound, within limits."""

from __future__ import annotations

import pytest

from prompt_store.errors import LookupThrottled, TaskNotFound
from prompt_store.lookups import LookupLimiter
from prompt_store.registry import TaskStore
from tests.fixtures import TinyBackbone
from tests.prompt_store.helpers import read_adapter


@pytest.fixture
def prompt_adapter(tiny_llama: TinyBackbone) -> tuple[bytes, bytes]:
    return read_adapter(tiny_llama.adapters["prompt_tuning"])


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def counting_lookups(store: TaskStore) -> list[str]:
    """The ids `store` asks its backend about, one entry per lookup request."""
    asked: list[str] = []
    versions = store.backend.versions

    def counted(task_id: str) -> list[int]:
        asked.append(task_id)
        return versions(task_id)

    store.backend.versions = counted  # type: ignore[method-assign]
    return asked


def test_register_on_one_store_is_servable_on_another_without_refresh(store_location, llama_fp, prompt_adapter):
    writer, replica = TaskStore(store_location, llama_fp), TaskStore(store_location, llama_fp)
    record, _ = writer.register("fresh", *prompt_adapter)
    assert replica.get("fresh") == record  # GET /v1/tasks/<id>, an OpenAI `model`
    assert replica.load("fresh").key == ("fresh", 1)  # a generation request


def test_flood_of_unknown_ids_is_limited_to_burst(store_location, llama_fp):
    limiter = LookupLimiter(per_second=20, burst=5, clock=FakeClock())
    store = TaskStore(store_location, llama_fp, lookups=limiter)
    asked = counting_lookups(store)
    for i in range(5):
        with pytest.raises(TaskNotFound):
            store.load(f"ghost-{i}")
    for i in range(5, 100):  # not a 404: the id may exist, this process cannot ask now
        with pytest.raises(LookupThrottled, match="cannot look it up"):
            store.load(f"ghost-{i}")
    assert len(asked) == 5 and limiter.num_refused == 95


def test_repeated_unknown_id_is_looked_up_once_within_negative_cache(store_location, llama_fp, prompt_adapter):
    clock = FakeClock()
    store = TaskStore(store_location, llama_fp, lookups=LookupLimiter(negative_s=0.5, clock=clock))
    asked = counting_lookups(store)
    for _ in range(10):
        with pytest.raises(TaskNotFound):
            store.get("ghost")
    assert asked == ["ghost"]
    TaskStore(store.location, llama_fp).register("ghost", *prompt_adapter)  # elsewhere, just now
    with pytest.raises(TaskNotFound):
        store.load("ghost")  # the documented exception: a miss less than negative_s ago
    clock.now += 0.5
    assert store.load("ghost").key == ("ghost", 1) and asked == ["ghost", "ghost"]


def test_own_registration_clears_negative_cache(store_location, llama_fp, prompt_adapter):
    store = TaskStore(store_location, llama_fp, lookups=LookupLimiter(clock=FakeClock()))
    with pytest.raises(TaskNotFound):
        store.get("task")
    store.register("task", *prompt_adapter)
    assert store.load("task").key == ("task", 1)


def test_token_bucket_refills_at_rate():
    clock = FakeClock()
    limiter = LookupLimiter(per_second=10, burst=2, negative_s=0, clock=clock)
    assert [limiter.allow() for _ in range(3)] == [True, True, False]
    clock.now += 0.11  # one token back (and a tenth of one)
    assert [limiter.allow() for _ in range(2)] == [True, False]
    clock.now += 10  # never more than the burst
    assert [limiter.allow() for _ in range(3)] == [True, True, False]


def test_invalid_id_is_never_looked_up(store_location, llama_fp):
    store = TaskStore(store_location, llama_fp)
    asked = counting_lookups(store)
    with pytest.raises(TaskNotFound):
        store.load("../escape")
    assert asked == []
