"""`python -m benchmarks.host_overhead`: the engine's own work per decode step, outside the model's forward.

On a GPU the forward of a decode step is a few milliseconds; whatever the engine thread does around it (scheduling,
index tensors, sampling, handing outputs to the event loop) adds to every step unless it is small. The built-in
0.8M-parameter backbone makes the forward cheap, so that work shows. The server's own AsyncEngine runs R rows (the
demo tasks and the bare backbone in turn; `greedy`: all greedy, `sampled`: half of them sampled with temperature,
top-k and top-p, a quarter seeded, an eighth asking for top log-probabilities), and once every row decodes, each step
is measured in the engine thread's CPU time (so other processes' load does not count):
- host: the engine thread's step (schedule, tensors, sampling, hand-off to the callers' event loop) minus the
  model's forward;
- attention Python: the engine's attention function minus the attention kernel (SDPA) inside it, summed over the
  layers (on a CPU this includes its gathers' memory traffic too);
- sampling: the part of host spent choosing the tokens (the draws and the sampler: on a CPU its tensor operations
  over the vocabulary are the host's own work; on a GPU they are kernels the host only launches).
Medians over the measured steps; per row = per step / R.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface

from benchmarks.offline import quiet_libraries
from server.demo import register_demo_tasks
from server.demo.tasks import sample_input
from server.engine import attention
from server.engine import engine as engine_module
from server.engine.async_engine import AsyncEngine, build_engine
from server.engine.config import EngineConfig
from server.engine.types import GenerateInput, SamplingParams

TASKS = ("upper", "reverse", "json", None)  # prompt tuning, prefix tuning, P-tuning, the bare backbone
WORKLOADS = ("greedy", "sampled")


@dataclass(slots=True)
class StepSample:
    step_s: float
    forward_s: float
    attention_s: float
    kernel_s: float  # SDPA inside the attention function
    sampling_s: float


@dataclass(slots=True)
class ThreadClock:
    """CPU seconds of the engine thread spent inside the wrapped pieces, for the step being measured."""

    forward_s: float = 0.0
    attention_s: float = 0.0
    kernel_s: float = 0.0
    sampling_s: float = 0.0
    samples: list[StepSample] = field(default_factory=list)

    def timed(self, original: Callable[..., Any], slot: str) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                setattr(self, slot, getattr(self, slot) + time.thread_time() - started)

        return wrapper

    def reset(self) -> None:
        self.forward_s = self.attention_s = self.kernel_s = self.sampling_s = 0.0


@contextlib.contextmanager
def clocked(engine: AsyncEngine, clock: ThreadClock, num_rows: int, num_samples: int) -> Iterator[None]:
    """Time the engine thread's steps; a step is kept once all `num_rows` rows decode (no prefill in it). After
    `num_samples` of them the engine steps no more: it waits for the callers' aborts, so a loaded machine whose event
    loop lags behind the steps cannot run the rows to their end before the loop sees the measurement is done."""
    model = engine.engine.runner.model
    step_once, sdpa = engine.step_once, attention.scaled_dot_product_attention
    sample, draws = engine_module.sample, engine_module.draws

    def measured_step() -> bool:
        if len(clock.samples) >= num_samples:
            return False  # computed nothing: the engine thread waits on its inbox
        clock.reset()
        started = time.thread_time()
        computed = step_once()
        step_s = time.thread_time() - started
        stats = engine.engine.last_step
        if stats is not None and stats.batch_size == num_rows and stats.num_prefill_tokens == 0:
            clock.samples.append(
                StepSample(step_s, clock.forward_s, clock.attention_s, clock.kernel_s, clock.sampling_s)
            )
        return computed

    engine.step_once = measured_step  # type: ignore[method-assign]
    model.forward = clock.timed(model.forward, "forward_s")
    engine_module.sample, engine_module.draws = clock.timed(sample, "sampling_s"), clock.timed(draws, "sampling_s")
    attention.scaled_dot_product_attention = clock.timed(sdpa, "kernel_s")
    AttentionInterface.register(attention.ATTENTION_NAME, clock.timed(attention.attend, "attention_s"))
    try:
        yield
    finally:
        AttentionInterface.register(attention.ATTENTION_NAME, attention.attend)
        attention.scaled_dot_product_attention = sdpa
        engine_module.sample, engine_module.draws = sample, draws
        del model.forward
        engine.step_once = step_once  # type: ignore[method-assign]


def sampling_of(i: int, workload: str, max_new_tokens: int) -> SamplingParams:
    if workload == "greedy" or i % 2 == 0:
        return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        ignore_eos=True,
        do_sample=True,
        temperature=0.8,
        top_k=40,
        top_p=0.95,
        seed=i if i % 4 == 1 else None,
        top_logprobs=5 if i % 8 == 3 else None,
    )


async def consume(engine: AsyncEngine, request: GenerateInput) -> None:
    async for _ in engine.generate(request):
        pass


async def run_rows(engine: AsyncEngine, num_rows: int, workload: str, num_steps: int, warmup: int) -> list[StepSample]:
    """Rows until `warmup + num_steps` all-decode steps have run; the last `num_steps` of them."""
    rng = random.Random(num_rows)
    clock = ThreadClock()
    inputs = [sample_input(rng, held_out=True) for _ in range(num_rows)]
    tasks = [(TASKS[i % len(TASKS)],) for i in range(num_rows)]
    requests = [GenerateInput(inputs[i], tasks[i], sampling=sampling_of(i, workload, 1000)) for i in range(num_rows)]
    with clocked(engine, clock, num_rows, warmup + num_steps):
        callers = [asyncio.ensure_future(consume(engine, request)) for request in requests]
        while len(clock.samples) < warmup + num_steps:
            failed = [caller for caller in callers if caller.done()]
            if failed:
                failed[0].result()  # a request ended early: say why
                raise RuntimeError("a request finished before the measurement did")
            await asyncio.sleep(0.05)
        for caller in callers:
            caller.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        while not engine.engine.is_idle():
            await asyncio.sleep(0.05)
    return clock.samples[warmup : warmup + num_steps]


@dataclass(frozen=True, slots=True)
class Measured:
    workload: str
    num_rows: int
    num_steps: int
    step_ms: float
    forward_ms: float
    host_ms: float
    host_us_per_row: float
    attention_python_ms: float
    attention_python_us_per_row: float
    sampling_ms: float
    sampling_us_per_row: float


def summarize(workload: str, num_rows: int, samples: list[StepSample]) -> Measured:
    def median_ms(values: list[float]) -> float:
        return 1000 * statistics.median(values)

    host = median_ms([s.step_s - s.forward_s for s in samples])
    python = median_ms([s.attention_s - s.kernel_s for s in samples])
    sampling = median_ms([s.sampling_s for s in samples])
    return Measured(
        workload=workload,
        num_rows=num_rows,
        num_steps=len(samples),
        step_ms=median_ms([s.step_s for s in samples]),
        forward_ms=median_ms([s.forward_s for s in samples]),
        host_ms=host,
        host_us_per_row=1000 * host / num_rows,
        attention_python_ms=python,
        attention_python_us_per_row=1000 * python / num_rows,
        sampling_ms=sampling,
        sampling_us_per_row=1000 * sampling / num_rows,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 256, 512])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--steps", type=int, default=20, help="decode steps measured per row count")
    parser.add_argument("--warmup", type=int, default=3, help="all-decode steps skipped first")
    add_run_options(parser)
    return parser.parse_args(argv)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of the benchmarks that time the engine's own work in a thread (this one, `benchmarks.sampler`)."""
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: thread CPU time is all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")


def write_results(args: argparse.Namespace, results: list[Any]) -> None:
    """--json: the run's options and its results (dataclasses), where asked."""
    if args.json:
        document = {"device": args.device, "threads": args.threads, "torch": torch.__version__,
                    "results": [asdict(result) for result in results]}  # fmt: skip
        args.json.write_text(json.dumps(document, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    results = []
    with tempfile.TemporaryDirectory(prefix="promptserve-host-") as store:
        config = EngineConfig(store_dir=store, device=args.device, max_batch_size=max(args.rows),
                              torch_threads=args.threads, poll_interval_s=0, self_check=False)  # fmt: skip
        engine = build_engine(config)
        try:
            register_demo_tasks(engine)
            print(f"host work per decode step, built-in backbone on {args.device}, {args.threads} torch threads")
            print(f"  {'workload':8} {'rows':>5} {'step ms':>8} {'forward':>8} {'host ms':>8} {'host µs/row':>12} "
                  f"{'attn Python ms':>15} {'µs/row':>7} {'sampling ms':>12} {'µs/row':>7}")  # fmt: skip
            for workload in args.workloads:
                for num_rows in args.rows:
                    samples = asyncio.run(run_rows(engine, num_rows, workload, args.steps, args.warmup))
                    m = summarize(workload, num_rows, samples)
                    results.append(m)
                    print(f"  {m.workload:8} {m.num_rows:5d} {m.step_ms:8.2f} {m.forward_ms:8.2f} {m.host_ms:8.2f} "
                          f"{m.host_us_per_row:12.1f} {m.attention_python_ms:15.2f} "
                          f"{m.attention_python_us_per_row:7.1f} {m.sampling_ms:12.2f} "
                          f"{m.sampling_us_per_row:7.1f}")  # fmt: skip
        finally:
            engine.shutdown()
    write_results(args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
