"""The device prompt cache: hits and misses, reference counts, LRU within a budget, pinning and retiring."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from prompt_store.cache import PromptCache
from prompt_store.registry import TaskStore
from prompt_store.types import CacheStats, DeviceTask, TaskArtifact, TaskKey
from tests.fixtures import TinyBackbone
from tests.prompt_store.helpers import read_adapter

PROMPT_BYTES = 5 * 48 * 4  # the llama prompt-tuning fixture in float32


@pytest.fixture(scope="module")
def artifacts(tiny_llama: TinyBackbone, llama_fp, tmp_path_factory) -> dict[str, TaskArtifact]:
    """Four same-sized prompt tasks a, b, c, d (version 1), a second version of a, and a prefix task."""
    store = TaskStore(tmp_path_factory.mktemp("cache-store"), llama_fp)
    adapter = read_adapter(tiny_llama.adapters["prompt_tuning"])
    for task_id in "abcd":
        store.register(task_id, *adapter)
    found = {task_id: store.load(task_id) for task_id in "abcd"}
    store.register("a", *adapter)
    found["a2"] = store.load("a")
    store.register_dir("prefix", tiny_llama.adapters["prefix"])
    found["prefix"] = store.load("prefix")
    return found


def make_cache(llama_fp, num_prompts: int) -> PromptCache:
    return PromptCache(llama_fp, "cpu", torch.float32, budget_bytes=num_prompts * PROMPT_BYTES)


def test_acquire_misses_then_hits(llama_fp, artifacts):
    cache = make_cache(llama_fp, 4)
    first = cache.acquire(artifacts["a"])
    second = cache.acquire(artifacts["a"])
    assert first is second and cache.ref_count(("a", 1)) == 2
    assert cache.stats() == CacheStats(hits=1, misses=1, resident_bytes=PROMPT_BYTES, num_entries=1)


def test_acquire_materializes_prefix_tasks(llama_fp, artifacts):
    cache = make_cache(llama_fp, 4)
    task = cache.acquire(artifacts["prefix"])
    assert len(task.prefix_keys) == 2 and task.prefix_keys[0].shape == (2, 3, 8)
    assert cache.stats().resident_bytes == task.nbytes == 3 * 64 * 4


def test_release_returns_every_count_to_zero(llama_fp, artifacts):
    cache = make_cache(llama_fp, 4)
    for name in ["a", "b", "a", "c", "a"]:
        cache.acquire(artifacts[name])
    assert cache.num_refs() == 5
    for name in ["a", "b", "a", "c", "a"]:
        cache.release(artifacts[name].key)
    assert cache.num_refs() == 0 and cache.stats().num_entries == 3  # still cached, now evictable


def test_release_without_reference_raises(llama_fp, artifacts):
    cache = make_cache(llama_fp, 4)
    cache.acquire(artifacts["a"])
    cache.release(("a", 1))
    with pytest.raises(ValueError, match="found none"):
        cache.release(("a", 1))
    with pytest.raises(ValueError):
        cache.release(("never", 1))


def test_evicts_least_recently_used_unreferenced_entry(llama_fp, artifacts):
    cache = make_cache(llama_fp, 2)
    for name in ["a", "b", "a", "c"]:  # a was used after b, so b is the LRU when c arrives
        cache.release(cache.acquire(artifacts[name]).key)
    assert set(cache.entries) == {("a", 1), ("c", 1)}
    assert cache.stats().evictions == 1 and cache.stats().resident_bytes == 2 * PROMPT_BYTES


def test_in_use_entries_never_evicted_when_over_budget(llama_fp, artifacts):
    cache = make_cache(llama_fp, 1)
    held = [cache.acquire(artifacts[name]) for name in "abc"]
    assert cache.stats().resident_bytes == 3 * PROMPT_BYTES and cache.stats().evictions == 0
    assert all(cache.ref_count(task.key) == 1 for task in held)


def test_over_budget_cache_shrinks_on_release(llama_fp, artifacts):
    cache = make_cache(llama_fp, 1)
    for name in "abc":
        cache.acquire(artifacts[name])
    cache.release(("b", 1))
    assert ("b", 1) not in cache.entries and cache.stats().evictions == 1
    cache.release(("a", 1))
    cache.release(("c", 1))
    assert list(cache.entries) == [("c", 1)] and cache.stats().resident_bytes == PROMPT_BYTES


def test_pinned_entry_never_evicted(llama_fp, artifacts):
    cache = make_cache(llama_fp, 1)
    cache.pin(artifacts["a"])
    cache.release(cache.acquire(artifacts["b"]).key)
    assert ("a", 1) in cache.entries and ("b", 1) not in cache.entries
    assert cache.stats().num_pinned == 1


def test_unpinned_entry_becomes_evictable(llama_fp, artifacts):
    cache = make_cache(llama_fp, 1)
    cache.pin(artifacts["a"])
    cache.pin(artifacts["b"])
    cache.unpin(("a", 1))
    assert list(cache.entries) == [("b", 1)] and cache.stats().num_pinned == 1


def test_retire_frees_unreferenced_old_version_now(llama_fp, artifacts):
    cache = make_cache(llama_fp, 4)
    cache.release(cache.acquire(artifacts["a"]).key)
    cache.acquire(artifacts["a2"])
    cache.retire("a", keep_version=2)
    assert list(cache.entries) == [("a", 2)]


def test_retire_keeps_referenced_version_until_last_release(llama_fp, artifacts):
    cache = make_cache(llama_fp, 4)
    old = cache.acquire(artifacts["a"])
    cache.acquire(artifacts["a"])
    cache.retire("a", keep_version=2)
    assert old.prompt_embeds is not None and ("a", 1) in cache.entries
    cache.release(("a", 1))
    assert ("a", 1) in cache.entries
    cache.release(("a", 1))
    assert ("a", 1) not in cache.entries and cache.num_refs() == 0 and cache.stats().resident_bytes == 0


def test_retire_without_keep_version_frees_every_version(llama_fp, artifacts):
    cache = make_cache(llama_fp, 4)
    cache.pin(artifacts["a"])
    cache.release(cache.acquire(artifacts["a2"]).key)
    cache.release(cache.acquire(artifacts["b"]).key)
    cache.retire("a", keep_version=None)
    assert list(cache.entries) == [("b", 1)] and cache.stats().num_pinned == 0


def test_acquire_casts_to_cache_dtype(llama_fp, artifacts):
    cache = PromptCache(llama_fp, "cpu", torch.bfloat16, budget_bytes=1 << 20)
    task = cache.acquire(artifacts["a"])
    assert task.prompt_embeds is not None and task.prompt_embeds.dtype == torch.bfloat16
    assert cache.stats().resident_bytes == PROMPT_BYTES // 2


def test_prepare_runs_once_per_materialisation_and_its_bytes_count(llama_fp, artifacts):
    prepared: list[TaskKey] = []

    def double(task: DeviceTask) -> DeviceTask:
        prepared.append(task.key)
        assert task.prompt_embeds is not None
        return replace(task, prompt_embeds=torch.cat([task.prompt_embeds, task.prompt_embeds]))

    cache = PromptCache(llama_fp, "cpu", torch.float32, budget_bytes=4 * PROMPT_BYTES, prepare=double)
    for name in ["a", "a", "b"]:
        cache.acquire(artifacts[name])
    assert prepared == [("a", 1), ("b", 1)]
    assert cache.stats().resident_bytes == 4 * PROMPT_BYTES
