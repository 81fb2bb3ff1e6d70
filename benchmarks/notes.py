"""What a generation comparison reports beside its ratio: the engine's steps, the workload, and how often its greedy
outputs equal the baseline's."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from benchmarks.engine_runs import RunResult
from benchmarks.workload import Workload


def tokens_per_s(run: Any) -> float:
    return run.tokens_per_s


def tokens_per_cpu_s(run: Any) -> float:
    return run.tokens_per_cpu_s


def match_rates(workload: Workload, matches: list[bool], method_of: dict[str, str]) -> dict[str, Any]:
    longest: dict[str | None, int] = defaultdict(int)
    for job in workload.jobs:
        longest[job.task_id] = max(longest[job.task_id], len(job.text))
    by_method: dict[str, list[bool]] = defaultdict(list)
    unpadded = []
    for job, match in zip(workload.jobs, matches, strict=True):
        by_method[method_of[str(job.task_id)]].append(match)
        if len(job.text) == longest[job.task_id]:
            unpadded.append(match)
    return {
        "match_rate": sum(matches) / len(matches),
        "match_rate_by_method": {method: sum(m) / len(m) for method, m in sorted(by_method.items())},
        "match_rate_unpadded_rows": sum(unpadded) / len(unpadded),
        "num_requests": len(matches),
    }


def step_notes(runs: list[RunResult]) -> dict[str, float]:
    """Where the engine's time went, from its StepStats (medians over runs)."""

    def median(field: str) -> float:
        return statistics.median(getattr(run.steps, field) for run in runs)

    return {
        "prefill_s": median("prefill_s"),
        "decode_s": median("decode_s"),
        "num_prefill_steps": median("num_prefill_steps"),
        "num_decode_steps": median("num_decode_steps"),
        "num_prefill_tokens": median("num_prefill_tokens"),
    }


def workload_notes(workload: Workload, num_tasks: int) -> dict[str, Any]:
    chars = [len(job.text) for job in workload.jobs]
    new = [job.max_new_tokens for job in workload.jobs]
    return {
        "num_requests": len(workload.jobs),
        "num_tasks": num_tasks,
        "input_tokens_min_mean_max": [min(chars) + 1, statistics.mean(chars) + 1, max(chars) + 1],
        "new_tokens_min_mean_max": [min(new), statistics.mean(new), max(new)],
        "num_new_tokens": workload.num_new_tokens,
    }
