"""What a task costs to keep: tensor and on-disk bytes per registered task, and the process memory (RSS) that
1,000 prompt-tuning tasks resident as device tensors (the task cache's input-embeddings form) add, over their
tensors' own bytes. Tasks held as keys and values live in the KV pool, allocated once at start: they add nothing.
LoRA tasks are measured in the engine's own adapter pool: its bytes per resident task (the
`promptserve_adapter_cache_*` gauges) and the RSS that registering and loading them adds, over their tensors' bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from benchmarks.engine_runs import EngineRig
from benchmarks.workload import Job, TaskSpec, Workload
from prompt_store.adapter import CONFIG_NAME, MODEL_NAME, StoreLimits
from prompt_store.materialize import materialize
from prompt_store.registry import TaskStore
from prompt_store.types import BackboneFingerprint, DeviceTask


def trimmed_rss() -> int:
    """RSS after a full collection and, on glibc, handing freed heap pages back (malloc_trim)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


def raw_rss() -> int:
    return psutil.Process().memory_info().rss


def disk_usage(path: Path) -> tuple[int, int]:
    """(apparent bytes of the files, bytes of the blocks they and their directories occupy)."""
    apparent, allocated = 0, os.stat(path).st_blocks * 512
    for folder, dirs, files in os.walk(path):
        for name in dirs:
            allocated += os.stat(Path(folder) / name).st_blocks * 512
        for name in files:
            stat = os.stat(Path(folder) / name)
            apparent, allocated = apparent + stat.st_size, allocated + stat.st_blocks * 512
    return apparent, allocated


def per_task_bytes(
    fingerprint: BackboneFingerprint, device: torch.device, dtype: torch.dtype, samples: list[TaskSpec], root: Path
) -> dict[str, Any]:
    """For one task of each method: device tensor bytes, upload bytes, and what the store holds on disk."""
    store = TaskStore(root, fingerprint, StoreLimits(max_virtual_tokens=1024))
    result: dict[str, Any] = {}
    for task in samples:
        record, _ = store.register_dir(task.task_id, task.adapter_dir)
        device_task = materialize(store.load(task.task_id), fingerprint, device, dtype)
        apparent, allocated = disk_usage(store.layout.task_dir(task.task_id))
        result[task.method] = {
            "num_virtual_tokens": task.num_virtual_tokens,
            "tensor_bytes": device_task.nbytes,
            "upload_bytes": record.bytes,  # adapter_config.json + adapter_model.safetensors
            "disk_bytes": apparent,  # the version's files: config, safetensors, record.json
            "disk_allocated_bytes": allocated,  # in filesystem blocks, directories included
        }
    return result


def random_prompt_upload(num_virtual_tokens: int, hidden_size: int, seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randn((num_virtual_tokens, hidden_size), generator=generator)  # [P, H] float32, as PEFT saves
    return save_safetensors({"prompt_embeddings": prompt})


def resident_task_growth(
    fingerprint: BackboneFingerprint,
    device: torch.device,
    dtype: torch.dtype,
    prompt_task: TaskSpec,
    root: Path,
    num_tasks: int = 1000,
) -> dict[str, Any]:
    """Register `num_tasks` prompt-tuning tasks, make them all resident as device tensors, and measure RSS."""
    config_bytes = (prompt_task.adapter_dir / CONFIG_NAME).read_bytes()
    fp_hidden = fingerprint.hidden_size
    is_cuda = device.type == "cuda"
    store = TaskStore(root, fingerprint, StoreLimits(max_virtual_tokens=1024))
    resident: dict[str, DeviceTask] = {}
    # One task through every path first, so one-time costs (lazy imports, first allocations) are not counted.
    store.register("warm-up", config_bytes, random_prompt_upload(prompt_task.num_virtual_tokens, fp_hidden, num_tasks))
    warm_up = materialize(store.load("warm-up"), fingerprint, device, dtype)
    rss_before, raw_before = trimmed_rss(), raw_rss()
    device_before = torch.cuda.memory_allocated(device) if is_cuda else 0
    started = time.perf_counter()
    for i in range(num_tasks):
        upload = random_prompt_upload(prompt_task.num_virtual_tokens, fp_hidden, seed=i)
        store.register(f"mem-{i:05d}", config_bytes, upload)
    register_s = time.perf_counter() - started
    rss_registered = trimmed_rss()
    started = time.perf_counter()
    for i in range(num_tasks):
        task_id = f"mem-{i:05d}"
        resident[task_id] = materialize(store.load(task_id), fingerprint, device, dtype)
    acquire_s = time.perf_counter() - started
    raw_after, rss_after = raw_rss(), trimmed_rss()
    tensor_bytes = sum(task.nbytes for task in resident.values())
    assert len(resident) == num_tasks and warm_up.nbytes * num_tasks == tensor_bytes
    result = {
        "num_tasks": num_tasks,
        "num_virtual_tokens": prompt_task.num_virtual_tokens,
        "tensor_bytes": tensor_bytes,
        "rss_growth_bytes": rss_after - rss_before,
        "rss_growth_over_tensor_bytes": (rss_after - rss_before) / tensor_bytes,
        "rss_growth_over_tensor_bytes_untrimmed": (raw_after - raw_before) / tensor_bytes,
        "overhead_bytes_per_task": (rss_after - rss_before - tensor_bytes) / num_tasks,
        "rss_growth_after_register_bytes": rss_registered - rss_before,
        "register_ms_per_task": 1000 * register_s / num_tasks,
        "load_and_acquire_ms_per_task": 1000 * acquire_s / num_tasks,
        "note": "RSS after gc + malloc_trim; '_untrimmed' is the raw RSS difference",
    }
    if is_cuda:
        result["device_growth_over_tensor_bytes"] = (torch.cuda.memory_allocated(device) - device_before) / tensor_bytes
    del resident, store
    return result


def random_lora_upload(template: TaskSpec, seed: int) -> tuple[bytes, bytes, int]:
    """A LoRA task shaped as `template` (its config, its tensors' names and shapes) with fresh random weights:
    (adapter_config.json, adapter_model.safetensors, its tensors' bytes)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {name: tensor.shape for name, tensor in load_file(template.adapter_dir / MODEL_NAME).items()}
    tensors = {name: torch.randn(shape, generator=generator) * 0.01 for name, shape in shapes.items()}
    upload = save_safetensors(tensors)
    return (template.adapter_dir / CONFIG_NAME).read_bytes(), upload, sum(t.nbytes for t in tensors.values())


def resident_lora_growth(rig: EngineRig, templates: list[TaskSpec], num_tasks: int) -> dict[str, Any]:
    """Register `num_tasks` LoRA tasks (cycling through the templates' shapes), make every one resident in the
    engine's adapter pool with a one-token request, and compare the pool's own bytes per task and the RSS growth
    with the tasks' tensor bytes."""
    # One task through every path first, so one-time costs (lazy imports, first allocations) are not counted.
    rig.store.register("lora-mem-warm-up", *random_lora_upload(templates[0], seed=0)[:2])
    rig.run(Workload("warm-up", [Job("warm up", "lora-mem-warm-up", 1)]))
    before, rss_before = rig.engine.tasks.stats(), trimmed_rss()
    tensor_bytes, task_ids = 0, [f"lora-mem-{i:04d}" for i in range(num_tasks)]
    started = time.perf_counter()
    for i, task_id in enumerate(task_ids):
        config, upload, num_bytes = random_lora_upload(templates[i % len(templates)], seed=1 + i)
        rig.store.register(task_id, config, upload)
        tensor_bytes += num_bytes
    register_s = time.perf_counter() - started
    rss_registered = trimmed_rss()
    rig.run(Workload("resident", [Job(f"row {i}", task_id, 1) for i, task_id in enumerate(task_ids)]))
    after, rss_after = rig.engine.tasks.stats(), trimmed_rss()
    num_resident = after.num_adapters - before.num_adapters
    num_evicted = after.evictions - before.evictions
    if num_resident != num_tasks or num_evicted:
        raise RuntimeError(
            f"expected {num_tasks} more resident LoRA tasks and no eviction; found {num_resident} more and "
            f"{num_evicted} evictions (raise max_loras or adapter_cache_bytes)"
        )
    pool_bytes = after.adapter_bytes - before.adapter_bytes
    return {
        "num_tasks": num_tasks,
        "tensor_bytes": tensor_bytes,
        "tensor_bytes_per_task": tensor_bytes / num_tasks,
        "pool_bytes": pool_bytes,
        "pool_bytes_over_tensor_bytes": pool_bytes / tensor_bytes,
        "rss_growth_bytes": rss_after - rss_before,
        "rss_growth_over_tensor_bytes": (rss_after - rss_before) / tensor_bytes,
        "rss_growth_after_register_bytes": rss_registered - rss_before,
        "register_ms_per_task": 1000 * register_s / num_tasks,
        "definition": (
            f"{num_tasks} LoRA tasks ({', '.join(t.shape for t in templates)} in turn) registered and each made "
            "resident by a one-token request; pool: the engine's adapter pool bytes per resident task (the "
            "promptserve_adapter_cache_used_bytes and _entries gauges) over the task's tensor bytes; RSS: the "
            "process's growth (after gc and malloc_trim) from before registering, over the same bytes"
        ),
    }
