"""`python -m benchmarks.sampler`: the sampler's time to choose a decode step's tokens over real vocabularies.

The built-in backbone's vocabulary is 259 tokens; a Llama's is 32,000 or 128,256, and the sampler's work grows with
it (on a CPU it is the host's own arithmetic; on a GPU, kernels). For R rows of random logits (scaled so that the
distributions are peaked, as a model's are) and each kind of row (all greedy; temperature only; top-k 50; top-p 0.9
alone, which ranks the whole vocabulary; top-k 50 with top-p 0.9), `choose` is timed in the calling thread's CPU
time on a CPU (other processes' load does not count) or in wall time after a synchronisation on a GPU, its median
over the repeats. The process keeps freed memory as the engine does on a CPU (`host_memory`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.host_overhead import add_run_options, write_results
from benchmarks.offline import quiet_libraries
from server.engine import host_memory
from server.engine.sampler import choose
from server.engine.types import SamplingParams

KINDS = {
    "greedy": SamplingParams(),
    "temperature": SamplingParams(do_sample=True, temperature=0.8),
    "top-k": SamplingParams(do_sample=True, temperature=0.8, top_k=50),
    "top-p": SamplingParams(do_sample=True, temperature=0.8, top_p=0.9),
    "top-k+top-p": SamplingParams(do_sample=True, temperature=0.8, top_k=50, top_p=0.9),
}


@dataclass(frozen=True)
class Timing:
    vocab: int
    kind: str
    num_rows: int
    ms: float  # median
    us_per_row: float


def timer(device: torch.device) -> Callable[[], float]:
    if device.type != "cuda":
        return time.thread_time
    return lambda: (torch.cuda.synchronize(device), time.perf_counter())[1]


def time_choose(vocab: int, kind: str, num_rows: int, repeats: int, device: torch.device) -> Timing:
    generator = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(num_rows, vocab, generator=generator) * 3).to(device)
    params = [KINDS[kind]] * num_rows
    uniforms = torch.rand(num_rows, dtype=torch.float64, generator=generator)
    clock = timer(device)
    choose(logits, params, uniforms)  # warm
    times = []
    for _ in range(repeats):
        start = clock()
        choose(logits, params, uniforms)
        times.append(1000 * (clock() - start))
    median = statistics.median(times)
    return Timing(vocab, kind, num_rows, median, 1000 * median / num_rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sampler", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, nargs="+", default=[259, 32000, 128256])
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--repeats", type=int, default=5)
    add_run_options(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        host_memory.keep_freed_memory()
    print(f"choose() for {args.rows} rows on {args.device}, {args.threads} torch threads, median of {args.repeats}")
    print(f"  {'vocab':>7} {'rows':12} {'ms':>9} {'µs/row':>9}")
    results = []
    with torch.inference_mode():
        for vocab in args.vocab:
            for kind in args.kinds:
                timing = time_choose(vocab, kind, args.rows, args.repeats, device)
                results.append(timing)
                print(f"  {vocab:7d} {kind:12} {timing.ms:9.2f} {timing.us_per_row:9.1f}", flush=True)
    write_results(args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
