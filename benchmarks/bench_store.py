"""`python -m benchmarks.bench_store`: the task store's durable write rate, start-up recovery and load times.

`--replicas N --store LOCATION` (a directory or s3://bucket/prefix, AWS_* variables for the endpoint) instead
times N registrations on one store and, right after each returns, the load of that task on a second store opened
on the same location (another replica that has not polled): registration -> servable elsewhere.

Adapters are synthetic PEFT files sized for the built-in default backbone (hidden 256, 4 layers, 2 KV heads);
every registration is fsynced, so the write rate is the disk's fsync rate more than ours. Measures, never asserts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import save as save_safetensors

from prompt_store import BackboneFingerprint, StoreLimits, TaskStore
from prompt_store.materialize import materialize

FINGERPRINT = BackboneFingerprint(
    model_type="llama",
    hidden_size=256,
    num_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=259,
)
PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
T = TypeVar("T")


def synthetic_adapter(peft_type: str, num_virtual_tokens: int, seed: int) -> tuple[bytes, bytes]:
    """What PEFT's save_pretrained writes for the default backbone."""
    fp = FINGERPRINT
    is_prefix = peft_type == "PREFIX_TUNING"
    width = fp.num_layers * 2 * fp.kv_dim if is_prefix else fp.hidden_size
    config = {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": num_virtual_tokens,
        "token_dim": fp.kv_dim if is_prefix else fp.hidden_size,
        "num_layers": fp.num_layers,
        "num_attention_heads": fp.num_key_value_heads if is_prefix else fp.num_attention_heads,
        "num_transformer_submodules": 1,
    }
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(num_virtual_tokens, width, generator=generator)  # [P, hidden] or [P, L*2*kv_dim]
    return json.dumps(config).encode(), save_safetensors({"prompt_embeddings": tensor}, metadata={"format": "pt"})


def timed(action: Callable[[], object]) -> float:
    return timed_value(action)[1]


def timed_value(action: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    value = action()
    return value, time.perf_counter() - started


def bench_register(store: TaskStore, adapters: list[tuple[bytes, bytes]]) -> list[float]:
    seconds = []
    for i, (adapter_config, adapter_model) in enumerate(adapters):
        started = time.perf_counter()
        store.register(f"task-{i:05d}", adapter_config, adapter_model)
        seconds.append(time.perf_counter() - started)
    return seconds


def bench_loads(store: TaskStore) -> list[float]:
    return [timed(lambda record=record: store.load(record.task_id)) for record in store.list()]


def bench_materialize(store: TaskStore) -> list[float]:
    artifacts = [store.load(record.task_id) for record in store.list()]
    return [timed(lambda a=a: materialize(a, FINGERPRINT, "cpu", torch.float32)) for a in artifacts]


def report(name: str, seconds: list[float]) -> None:
    mean_ms = 1000 * statistics.fmean(seconds)
    p99_ms = 1000 * sorted(seconds)[int(0.99 * (len(seconds) - 1))]
    print(f"{name:<34} mean {mean_ms:8.3f} ms   p99 {p99_ms:8.3f} ms   ({len(seconds)} calls)")


def run(root: Path, num_tasks: int, num_virtual_tokens: int) -> None:
    adapters = [synthetic_adapter(PEFT_TYPES[i % 3], num_virtual_tokens, seed=i) for i in range(num_tasks)]
    print(f"store {root}: {num_tasks} tasks, {num_virtual_tokens} virtual tokens, methods {', '.join(PEFT_TYPES)}")
    store = TaskStore(root, FINGERPRINT, StoreLimits())
    register_s = bench_register(store, adapters)
    print(f"{'registrations/s (durable, 1 thread)':<34} {len(register_s) / sum(register_s):8.1f}")
    report("register", register_s)
    recovered, recovery_s = timed_value(lambda: TaskStore(root, FINGERPRINT))
    print(f"{'start-up recovery':<34} {recovery_s:8.3f} s   ({len(recovered)} tasks recovered)")
    report("load from disk (read + validate)", bench_loads(TaskStore(root, FINGERPRINT, max_cached_artifacts=0)))
    report("load, CPU LRU hit", [timed(lambda: recovered.load("task-00000")) for _ in range(1000)])
    report("refresh, nothing changed", [timed(recovered.refresh) for _ in range(20)])
    report("materialize (CPU fp32)", bench_materialize(recovered))


def percentiles(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p50, p99 = ordered[len(ordered) // 2], ordered[int(0.99 * (len(ordered) - 1))]
    return f"p50 {1000 * p50:8.2f} ms   p99 {1000 * p99:8.2f} ms   ({len(ordered)} tries)"


def run_replicas(location: str, num_tries: int, num_virtual_tokens: int) -> None:
    writer, replica = TaskStore(location, FINGERPRINT), TaskStore(location, FINGERPRINT)
    register_s, servable_s = [], []
    for i in range(num_tries):
        adapter_config, adapter_model = synthetic_adapter(PEFT_TYPES[i % 3], num_virtual_tokens, seed=i)
        started = time.perf_counter()
        writer.register(f"replica-{i:05d}", adapter_config, adapter_model)
        registered = time.perf_counter()
        replica.load(f"replica-{i:05d}")  # unknown to it: looked up in the store, never a 404
        servable_s.append(time.perf_counter() - registered)
        register_s.append(registered - started)
    print(f"store {location}: {num_virtual_tokens} virtual tokens")
    print(f"{'register (durable)':<34} {percentiles(register_s)}")
    print(f"{'register -> load on another store':<34} {percentiles(servable_s)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-tasks", type=int, default=1000)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--root", type=Path, default=None, help="an empty directory (default: a temporary one)")
    parser.add_argument("--replicas", type=int, default=0, help="tries of register here -> load on another store")
    parser.add_argument("--store", default=None, help="with --replicas: a directory or s3://bucket/prefix")
    args = parser.parse_args()
    if args.replicas:
        with tempfile.TemporaryDirectory(prefix="bench-store-") as root:
            run_replicas(args.store or root, args.replicas, args.virtual_tokens)
        return
    if args.root is not None:
        run(args.root, args.num_tasks, args.virtual_tokens)
        return
    with tempfile.TemporaryDirectory(prefix="bench-store-") as root:
        run(Path(root), args.num_tasks, args.virtual_tokens)


if __name__ == "__main__":
    main()
