"""Throughput against the number of distinct tasks in the load (the figure S-LoRA and Punica open with).

The same number of requests is spread over 1, 2, 4 ... tasks. The engine runs them as one mixed batch whatever
the count; PEFT serves one adapter per batch, so each task's requests form a batch of their own, one after
another. Drawn as a PNG with matplotlib when it is installed (`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from benchmarks.engine_runs import EngineRig
from benchmarks.peft_baseline import PeftServer
from benchmarks.workload import Job, TaskSpec, Workload, input_lengths, random_text


def sweep_workload(
    rng: random.Random, tasks: list[TaskSpec], num_requests: int, input_chars: tuple[int, int], new_tokens: int
) -> Workload:
    """`num_requests` requests spread evenly over `tasks`, in random order."""
    task_ids = [tasks[i % len(tasks)].task_id for i in range(num_requests)]
    rng.shuffle(task_ids)
    lengths = input_lengths(rng, num_requests, *input_chars)
    jobs = [Job(random_text(rng, n), t, new_tokens) for t, n in zip(task_ids, lengths, strict=True)]
    return Workload(f"{len(tasks)} tasks", jobs)


def throughput_by_tasks(
    rig: EngineRig,
    peft: PeftServer,
    tasks: list[TaskSpec],
    counts: list[int],
    num_requests: int,
    input_chars: tuple[int, int],
    new_tokens: int,
    rng: random.Random,
) -> dict[str, Any]:
    rig.set_max_batch_size(num_requests)
    points = []
    for count in counts:
        workload = sweep_workload(rng, tasks[:count], num_requests, input_chars, new_tokens)
        rig.run(workload)  # warm-up: the tasks' keys and values, first allocations
        engine = rig.run(workload).tokens_per_s
        baseline = peft.run(workload).tokens_per_s
        points.append({"num_tasks": count, "engine_tokens_per_s": engine, "peft_tokens_per_s": baseline})
    return {
        "points": points,
        "definition": (
            f"{num_requests} requests ({input_chars[0] + 1}-{input_chars[1] + 1} input tokens, {new_tokens} new "
            "tokens) spread evenly over N tasks, half prompt tuning and half prefix tuning; engine: one mixed "
            f"batch (max_batch_size {num_requests}); PEFT: each task's requests in one generate, task after task"
        ),
    }


def plot(sweep: dict[str, Any], path: Path, title: str) -> Path | None:
    """The sweep as a PNG; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    counts = [p["num_tasks"] for p in sweep["points"]]
    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    axes.plot(counts, [p["engine_tokens_per_s"] for p in sweep["points"]], "o-", label="promptserve: one mixed batch")
    axes.plot(counts, [p["peft_tokens_per_s"] for p in sweep["points"]], "s--", label="PEFT: a batch per task")
    axes.set_xscale("log", base=2)
    axes.set_xticks(counts, [str(c) for c in counts])
    axes.set_xlabel("distinct tasks in the load")
    axes.set_ylabel("generated tokens / s")
    axes.set_ylim(bottom=0)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
