"""LoRA and IA3 tasks' host tier (vLLM's max_cpu_loras): a task the device pool evicted loads again from host memory,
a copy to the device without a read of the store, and answers exactly as before; past max_cpu_loras it is read again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from prompt_store.registry import TaskStore
from tests.engine.harness import Harness, token_ids
from tests.fixtures import TinyBackbone
from tests.lora_fixtures import write_module_adapter

TARGETS = {"lora-a": ["q_proj", "down_proj"], "lora-b": ["v_proj", "up_proj"], "lora-c": ["k_proj"]}


@pytest.fixture(scope="module")
def module_adapters(tiny_llama: TinyBackbone, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-host-tier")
    return {
        name: write_module_adapter(tiny_llama.path, "lora", root / name, seed=seed, target_modules=targets)
        for seed, (name, targets) in enumerate(TARGETS.items())
    }


def served(
    tiny: TinyBackbone, store: Path, adapters: dict[str, Path], max_cached_artifacts: int = 256, **config: Any
) -> tuple[Harness, list[Any]]:
    """A harness whose device pool holds one LoRA task, its store opened afresh (nothing in host memory) with the
    engine's max_cpu_loras, and the store reads it makes."""
    harness = Harness(tiny, store, max_loras=1, **config)
    for name, directory in adapters.items():
        harness.store.register_dir(name, directory)
    harness.store = TaskStore(store, harness.backbone.fingerprint, max_cached_artifacts=max_cached_artifacts,
                              max_cached_adapters=harness.config.num_cpu_loras)  # fmt: skip
    reads: list[Any] = []
    real = harness.store.backend.read

    def counted(task_id: str, version: int, *args: Any, **kwargs: Any) -> Any:
        reads.append((task_id, version))
        return real(task_id, version, *args, **kwargs)

    harness.store.backend.read = counted  # type: ignore[method-assign]
    return harness, reads


def test_a_lora_task_evicted_from_the_device_loads_again_without_a_store_read(
    tiny_llama: TinyBackbone, tmp_path: Path, module_adapters: dict[str, Path]
) -> None:
    harness, reads = served(tiny_llama, tmp_path / "store", module_adapters, max_cpu_loras=3)
    first = token_ids(harness.alone("hello world", "lora-a", max_new_tokens=8))
    harness.alone("hello world", "lora-b", max_new_tokens=8)
    harness.alone("hello world", "lora-c", max_new_tokens=8)
    assert ("lora-a", 1) not in harness.engine.tasks.adapters.resident  # evicted from the device pool
    before = harness.store.cached_adapter_stats()
    misses = harness.engine.tasks.num_misses
    assert token_ids(harness.alone("hello world", "lora-a", max_new_tokens=8)) == first
    assert reads == []  # each was read once, when the store opened and listed its tasks
    after = harness.store.cached_adapter_stats()
    assert after.hits == before.hits + 1 and after.misses == before.misses
    assert harness.engine.tasks.num_misses == misses + 1  # loaded onto the device again, from host memory
    assert after.num_entries == 3 and after.max_entries == 3
    assert after.num_bytes == sum(harness.store.load(task).nbytes for task in TARGETS)


def test_past_max_cpu_loras_an_evicted_task_is_read_from_the_store_again(
    tiny_llama: TinyBackbone, tmp_path: Path, module_adapters: dict[str, Path]
) -> None:
    harness, reads = served(tiny_llama, tmp_path / "store", module_adapters, max_cpu_loras=2)
    first = token_ids(harness.alone("hello world", "lora-a", max_new_tokens=8))
    harness.alone("hello world", "lora-b", max_new_tokens=8)
    harness.alone("hello world", "lora-c", max_new_tokens=8)
    assert token_ids(harness.alone("hello world", "lora-a", max_new_tokens=8)) == first
    assert reads == [("lora-a", 1), ("lora-b", 1), ("lora-c", 1), ("lora-a", 1)]  # the opening kept the last two
    stats = harness.store.cached_adapter_stats()
    assert stats.misses == 4 and stats.num_entries == 2


def test_prompt_tasks_do_not_push_lora_tasks_out_of_host_memory(
    tiny_llama: TinyBackbone, tmp_path: Path, module_adapters: dict[str, Path]
) -> None:
    """The prompt-learning shelf has its own bounds: one prompt task pushes the other out, not the LoRA task."""
    harness, reads = served(tiny_llama, tmp_path / "store", module_adapters, max_cached_artifacts=1)
    for task in ("lora-a", "prefix", "prompt_tuning", "lora-a", "prefix"):
        harness.alone("hello world", task, max_new_tokens=2)
    assert ("lora-a", 1) not in reads and reads.count(("prefix", 1)) == 2  # pushed out by prompt_tuning
