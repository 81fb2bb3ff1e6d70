"""`python -m benchmarks.attention_backends`: one layer's attention over the KV pool, SDPA against FlexAttention.

The engine's two backends (server/engine/attention.py's SDPA, server/engine/paged_flex.py's FlexAttention) attend
the same rows over the same pool: decode rows (one new token each) and prefill chunks, every row's keys in blocks
scattered over the pool, a task's prefix blocks shared by half the rows. Side by side in one run:
- sdpa: gathers each batch's keys and values into padded tensors, builds a boolean mask, calls SDPA;
- flex (uncompiled): what `attention_backend=flex` runs on a CPU;
- flex (compiled, default): `torch.compile(flex_attention)`, what it runs on CUDA; its first call of each new shape
  compiles (timed apart: `first_call_s`), and a step's shapes change with its rows, so three shapes are timed (after
  the first, torch.compile recompiles with dynamic sizes);
- flex (compiled, static), `--compile static`: the same with `dynamic=False`, a new kernel for every new shape.
Medians of wall time per layer, each step's masks (or gathers' indices) built once for its layers as in the engine,
the backends taking turns; the compiler's cache is a fresh directory, so first calls include a cold compile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention.flex_attention import flex_attention

from server.engine.attention import SDPA, UNBOUNDED, AttentionBackend, RowBatch, Scoring
from server.engine.paged_flex import FlexBackend


@dataclass(frozen=True, slots=True)
class Shape:
    name: str
    num_rows: int
    num_new: int  # per row
    num_keys: int  # per row, the new tokens included


@dataclass(slots=True)
class Timing:
    backend: str
    shape: str
    call_ms: float  # median per call, warm
    first_call_s: float  # the first call of this shape (compiles where compiled)
    ratio_to_sdpa: float = 0.0


def rows_of(shape: Shape, pool_blocks: int, block_size: int, generator: torch.Generator) -> list[RowBatch]:
    """The shape's rows over random pool blocks: the first half share a 2-block prefix."""
    blocks_per_row = -(-shape.num_keys // block_size)
    order = (torch.randperm(pool_blocks - 1, generator=generator) + 1)[: 2 + shape.num_rows * blocks_per_row]
    shared, own = order[:2], order[2:].view(shape.num_rows, blocks_per_row)
    with_prefix = torch.cat([shared.expand(shape.num_rows // 2, -1), own[: shape.num_rows // 2, :-2]], dim=1)
    table = torch.cat([with_prefix, own[shape.num_rows // 2 :]])  # [R, blocks]
    key_slots = (table[:, :, None] * block_size + torch.arange(block_size)).flatten(1)  # [R, blocks * size]
    key_lengths = torch.full((shape.num_rows,), shape.num_keys)
    num_new = torch.full((shape.num_rows,), shape.num_new)
    offsets = torch.arange(shape.num_rows) * shape.num_new
    return RowBatch.tiles(key_slots, key_lengths, offsets, num_new, key_lengths - num_new, UNBOUNDED)


def time_backends(
    backends: dict[str, AttentionBackend], shape: Shape, pool: tuple[torch.Tensor, torch.Tensor], heads: int,
    repeats: int, layers: int, block_size: int,
) -> list[Timing]:  # fmt: skip
    """Each backend's first call of the shape, then `repeats` steps of `layers` calls, the backends taking turns
    (so the machine's other load falls on all of them alike)."""
    keys, values = pool
    query = torch.randn(1, heads, shape.num_rows * shape.num_new, keys.shape[2], generator=torch.Generator())
    query = query.to(keys.device, keys.dtype)

    def step(backend: AttentionBackend) -> float:
        """A new step's rows (its masks built again), over `layers` layers: seconds per layer."""
        batches = rows_of(shape, len(keys) // block_size, block_size, torch.Generator().manual_seed(0))
        batches = [batch.to(keys.device) for batch in batches]
        synchronize(keys.device)
        start = time.perf_counter()
        for _ in range(layers):
            backend.attend(query, keys.shape[1], keys, values, batches, Scoring())
        synchronize(keys.device)
        return (time.perf_counter() - start) / layers

    firsts: dict[str, float] = {}
    durations: dict[str, list[float]] = {label: [] for label in backends}
    for label, backend in list(backends.items()):
        try:
            firsts[label] = step(backend)  # the first call of the shape: compiles where compiled
        except Exception as error:  # a compiler failure is a finding, reported beside the others
            print(f"{label:24} {shape.name:32} failed: {type(error).__name__}: {str(error).splitlines()[0]}")
            continue
    for _ in range(repeats):
        for label in firsts:
            durations[label].append(step(backends[label]))
    return [Timing(label, shape.name, 1e3 * statistics.median(durations[label]), firsts[label]) for label in firsts]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SHAPES = {
    "tiny": [Shape("decode 4 rows x 40 keys", 4, 1, 40), Shape("prefill 2 rows x 8 new of 24", 2, 8, 24)],
    "cpu": [Shape("decode 32 rows x 448 keys", 32, 1, 448), Shape("prefill 4 rows x 64 new of 256", 4, 64, 256),
            Shape("decode 16 rows x 300 keys", 16, 1, 300)],
    "gpu": [Shape("decode 32 rows x 448 keys", 32, 1, 448), Shape("prefill 4 rows x 64 new of 256", 4, 64, 256),
            Shape("decode 256 rows x 1024 keys", 256, 1, 1024), Shape("decode 32 rows x 4096 keys", 32, 1, 4096),
            Shape("prefill 8 rows x 512 new of 1024", 8, 512, 1024)],
}  # fmt: skip
POOL_TOKENS = {"tiny": 1024, "cpu": 16384, "gpu": 1 << 19}


def compiled_flex(block_size: int, dynamic: bool | None) -> FlexBackend:
    backend = FlexBackend(block_size, compiled=True)
    backend.kernel = torch.compile(flex_attention, dynamic=dynamic)
    return backend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=list(SHAPES), help="the shapes (and pool); default: gpu on CUDA, else cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="steps timed per backend and shape")
    parser.add_argument("--layers", type=int, default=2, help="calls per step (a step's masks serve every layer)")
    parser.add_argument(
        "--compile",
        choices=("default", "static", "none"),
        default="default",
        help="the compiled flex beside the others: torch.compile's default (what the engine runs on CUDA), static "
        "shapes (a kernel per shape), or none (one per process: torch.compile shares its graphs per function)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="attention-backends-")  # a cold compile
    device = torch.device(args.device)
    size = args.size or ("gpu" if device.type == "cuda" else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    generator = torch.Generator().manual_seed(0)
    shape = (POOL_TOKENS[size], args.kv_heads, args.head_dim)
    pool = tuple(torch.randn(shape, generator=generator).to(device, dtype) for _ in range(2))
    backends: list[tuple[str, AttentionBackend]] = [("sdpa", SDPA)]
    if device.type == "cpu":  # uncompiled, it holds every row's scores over the whole pool: not on a GPU's pool
        backends.append(("flex (uncompiled)", FlexBackend(args.block_size, compiled=False)))
    if args.compile != "none":
        dynamic = None if args.compile == "default" else False  # default: shapes after the first with dynamic sizes
        backends.append((f"flex (compiled, {args.compile})", compiled_flex(args.block_size, dynamic)))
    load = os.getloadavg()
    timings: list[Timing] = []
    for chosen in SHAPES[size]:
        timings += time_backends(
            dict(backends), chosen, (pool[0], pool[1]), args.heads, args.repeats, args.layers, args.block_size
        )
    reference = {t.shape: t.call_ms for t in timings if t.backend == "sdpa"}
    for timing in timings:
        timing.ratio_to_sdpa = timing.call_ms / reference[timing.shape]
        print(f"{timing.backend:24} {timing.shape:32} {timing.call_ms:9.2f} ms a call ({timing.ratio_to_sdpa:6.2f}x "
              f"sdpa), first call {timing.first_call_s:7.2f} s")  # fmt: skip
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch {torch.__version__}; {device}, {dtype}")
    if args.json is not None:
        report: dict[str, Any] = {
            "load_average": load,
            "device": str(device),
            "torch": torch.__version__,
            "args": vars(args) | {"json": str(args.json)},
            "timings": [asdict(t) for t in timings],
        }
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
