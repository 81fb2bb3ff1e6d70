"""`python -m benchmarks.profile_engine`: where an engine step's time goes, on the benchmarks' CPU workloads.

Light timers wrap the engine's pieces (model forward, KV writes, gathers and attention inside it, input and index
building, sampling, detokenization, the scheduler); what no timer covers is the step's own Python.
`--cprofile N` also prints cProfile's top N functions (cProfile slows Python code, so its shares run high).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.engine_runs import CONTINUOUS, EngineRig
from benchmarks.offline import FULL, QUICK, Plan, quiet_libraries
from benchmarks.workload import (
    poisson_arrivals,
    round_robin_workload,
    shuffled_workload,
    varied_output_workload,
    with_arrivals,
    write_backbone,
    write_tasks,
)
from server.engine import attention, engine, model_runner

Totals = dict[str, list[float]]  # name -> [seconds, calls]


class Timers:
    def __init__(self) -> None:
        self.totals: Totals = defaultdict(lambda: [0.0, 0])
        self.undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        """Replace `owner.name` (a class, instance or module attribute) with a timed version, undone later."""
        own = vars(owner).get(name)  # None: inherited from the class, so deleting the wrapper restores it
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                entry = self.totals[label]
                entry[0] += time.perf_counter() - started
                entry[1] += 1

        setattr(owner, name, staticmethod(timed) if isinstance(own, staticmethod) else timed)
        self.undo.append(lambda: delattr(owner, name) if own is None else setattr(owner, name, own))

    @contextmanager
    def installed(self, rig: EngineRig) -> Iterator[None]:
        runner = rig.engine.runner
        model = runner.model
        self.wrap(engine.Engine, "step", "step (total)")
        self.wrap(runner, "run", "runner (total)")
        self.wrap(model, "forward", "model forward")
        self.wrap(attention.StepKV, "write", "  KV write (StepKV.write)")
        self.wrap(attention.RowBatch, "gather", "  KV gather (pool -> padded rows)")
        self.wrap(attention.RowBatch, "build_mask", "  attention mask (RowBatch.build_mask)")
        self.wrap(attention, "scaled_dot_product_attention", "  attention (SDPA over the rows' keys)")
        self.wrap(runner, "input_embeds", "input embeds")
        self.wrap(model_runner.StreamLayout, "of", "stream layout (slots, positions, queries)")
        self.wrap(engine, "sample", "sampling")
        self.wrap(engine.Engine, "append_token", "append_token (detokenize, stop check)")
        self.wrap(rig.engine.scheduler, "schedule", "scheduler")
        self.wrap(rig.engine.tasks, "fill", "task keys and values (computed on first use)")
        try:
            yield
        finally:
            for undo in reversed(self.undo):
                undo()


def print_breakdown(totals: Totals, wall_s: float, num_tokens: int) -> None:
    step = totals["step (total)"][0]
    print(f"  wall {wall_s:.2f} s for {num_tokens} generated tokens ({num_tokens / wall_s:.1f} tokens/s)")
    print(f"  {'piece':48} {'seconds':>8} {'of steps':>9} {'calls':>7} {'ms/call':>8}")
    covered = 0.0
    for label, (seconds, calls) in sorted(totals.items(), key=lambda item: -item[1][0]):
        print(f"  {label:48} {seconds:8.3f} {100 * seconds / step:8.1f}% {calls:7d} {1000 * seconds / calls:8.2f}")
        if label in TOP_LEVEL:
            covered += seconds
    print(f"  {'step Python not covered above':48} {step - covered:8.3f} {100 * (step - covered) / step:8.1f}%")


# Pieces that do not nest inside one another (within a step); the rest of the step is the engine's own Python.
TOP_LEVEL = {
    "model forward",
    "input embeds",
    "stream layout (slots, positions, queries)",
    "sampling",
    "append_token (detokenize, stop check)",
    "scheduler",
    "task keys and values (computed on first use)",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_engine", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--workload", choices=("mixed", "peft", "arrivals"), default="peft")
    parser.add_argument("--new-tokens", type=int, help="tokens per request (mixed and peft workloads)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="also print cProfile's top N")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_workload(name: str, plan: Plan, rig: EngineRig, tasks: list, rng: random.Random) -> Any:
    if name == "mixed":
        rig.set_max_batch_size(plan.num_tasks)
        return round_robin_workload(rng, tasks, plan.mixed_requests_per_task, plan.input_chars, plan.new_tokens)
    if name == "peft":
        rig.set_max_batch_size(plan.peft_max_batch_size)
        chosen = tasks[: plan.peft_num_tasks]
        return shuffled_workload(rng, chosen, plan.peft_requests_per_task, plan.input_chars, plan.new_tokens)
    rig.set_max_batch_size(plan.num_tasks)
    at_once = varied_output_workload(rng, tasks, plan.static_num_requests, plan.input_chars, plan.static_new_tokens)
    seconds = rig.run(at_once).seconds
    rate = plan.static_load * len(at_once.jobs) / seconds
    return with_arrivals(at_once, poisson_arrivals(rng, len(at_once.jobs), rate))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.new_tokens:
        plan = replace(plan, new_tokens=args.new_tokens)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="promptserve-profile-") as scratch:
        root = Path(scratch)
        backbone_dir = write_backbone(plan.preset, root / "backbone", seed=args.seed)
        tasks = write_tasks(backbone_dir, root / "tasks", plan.num_tasks, plan.num_virtual_tokens)
        rig = EngineRig.open(backbone_dir, root / "store", tasks, "cpu", "float32", plan.num_tasks)
        workload = build_workload(args.workload, plan, rig, tasks, rng)
        rig.run(workload)  # warm-up
        timers = Timers()
        with timers.installed(rig):
            result = rig.run(workload, CONTINUOUS)
        print(f"engine profile, workload {args.workload!r}, {torch.get_num_threads()} torch threads")
        print_breakdown(timers.totals, result.seconds, result.num_new_tokens)
        steps = result.steps
        print(
            f"  {steps.num_prefill_steps} prefill steps ({steps.prefill_s:.2f} s, {steps.num_prefill_tokens} tokens "
            f"without padding), {steps.num_decode_steps} decode steps ({steps.decode_s:.2f} s)"
        )
        if args.cprofile:
            profiler = cProfile.Profile()
            profiler.enable()
            rig.run(workload, CONTINUOUS)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
