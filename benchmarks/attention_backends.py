"""`python -m benchmarks.attention_backends`: one layer's attention over the KV pool, SDPA against FlexAttention.

The engine's two backends (server/engine/attention.py's SDPA, server/engine/paged_flex.py's FlexAttention) attend
the same rows over the same pool: decode rows (one new token each) and prefill chunks, every row's keys in blocks
scattered over the pool, a task's prefix blocks shared by half the rows. Side by side in one run:
- sdpa: gathers each batch's keys and values into padded tensors, builds a boolean mask, calls SDPA;
- flex (uncompiled): what `attention_backend=flex` runs on a CPU;
- flex (compiled): `torch.compile(flex_attention)`, what it runs on CUDA; its first call of each new shape compiles
  (timed apart: `compile_s`), and a step's shapes change with its rows, so later shapes are timed too.
Medians of wall time per call (with each step's mask built once, as in the engine, amortised over the layers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from server.engine.attention import SDPA, UNBOUNDED, AttentionBackend, RowBatch
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
    table = torch.cat([shared.expand(shape.num_rows // 2, -1), own[: shape.num_rows // 2, :-2]])
    table = torch.cat([table, own[shape.num_rows // 2 :]])  # [R, blocks]
    key_slots = (table[:, :, None] * block_size + torch.arange(block_size)).flatten(1)  # [R, blocks * size]
    key_lengths = torch.full((shape.num_rows,), shape.num_keys)
    num_new = torch.full((shape.num_rows,), shape.num_new)
    offsets = torch.arange(shape.num_rows) * shape.num_new
    return RowBatch.tiles(key_slots, key_lengths, offsets, num_new, key_lengths - num_new, UNBOUNDED)


def time_backend(
    backend: AttentionBackend, shape: Shape, pool: tuple[torch.Tensor, torch.Tensor], heads: int, repeats: int,
    generator: torch.Generator,
) -> Timing:  # fmt: skip
    keys, values = pool
    block_size = getattr(backend, "block_size", 16)
    query = torch.randn(1, heads, shape.num_rows * shape.num_new, keys.shape[2], generator=generator)

    def call(batches: list[RowBatch]) -> None:
        backend.attend(query, keys.shape[1], keys, values, batches, None)

    def fresh() -> list[RowBatch]:  # a new step: its masks built again
        return rows_of(shape, len(keys) // block_size, block_size, torch.Generator().manual_seed(0))

    start = time.perf_counter()
    call(fresh())
    first = time.perf_counter() - start
    durations = []
    for _ in range(repeats):
        batches = fresh()
        start = time.perf_counter()
        call(batches)
        durations.append(time.perf_counter() - start)
    return Timing(backend.name, shape.name, 1e3 * statistics.median(durations), first)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pool-tokens", type=int, default=16384, help="slots in the pool (one layer)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compiled", action="store_true", help="skip the compiled flex (its compile is slow)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    shape = (args.pool_tokens, args.kv_heads, args.head_dim)
    pool = (torch.randn(shape, generator=generator).to(device), torch.randn(shape, generator=generator).to(device))
    shapes = [Shape("decode 32 rows x 512 keys", 32, 1, 512), Shape("prefill 4 rows x 64 new of 256", 4, 64, 256),
              Shape("decode 16 rows x 300 keys", 16, 1, 300)]  # fmt: skip
    backends: list[tuple[str, Callable[[], AttentionBackend]]] = [
        ("sdpa", lambda: SDPA),
        ("flex (uncompiled)", lambda: FlexBackend(args.block_size, compiled=False)),
    ]
    if not args.no_compiled:
        backends.append(("flex (compiled)", lambda: FlexBackend(args.block_size, compiled=True)))
    load = os.getloadavg()
    timings: list[Timing] = []
    for label, make in backends:
        backend = make()
        for chosen in shapes:
            try:
                timing = time_backend(backend, chosen, pool, args.heads, args.repeats, generator)
            except Exception as error:  # a compiler failure is a finding, reported beside the others
                print(f"{label:18} {chosen.name:32} failed: {type(error).__name__}: {str(error).splitlines()[0]}")
                continue
            timing.backend = label
            timings.append(timing)
    reference = {t.shape: t.call_ms for t in timings if t.backend == "sdpa"}
    for timing in timings:
        timing.ratio_to_sdpa = timing.call_ms / reference[timing.shape]
        print(f"{timing.backend:18} {timing.shape:32} {timing.call_ms:9.2f} ms a call ({timing.ratio_to_sdpa:6.2f}x "
              f"sdpa), first call {timing.first_call_s:7.2f} s")  # fmt: skip
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch {torch.__version__}; {device}")
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
