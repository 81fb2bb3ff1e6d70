"""`python -m benchmarks --preset cpu-classify`: classification on a random encoder with PEFT `SEQ_CLS` tasks of
three kinds (prompt tuning, P-tuning, prefix tuning / P-Tuning v2), both ratios measured in one process, A B A B.

mixed_over_uniform  requests cycling through every task vs. the same requests on one task per kind
engine_over_peft    the engine vs. PEFT's way: per task, `set_adapter` and one padded forward of its inputs

Throughput is classified inputs per second; every request is one input under one task, all queued at t=0.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.compare import alternate
from benchmarks.engine_runs import ClassifyRun, EngineRig
from benchmarks.peft_classifier import PeftClassifier, PeftClassifyRun
from benchmarks.report import finish, log, new_result, run_dtype
from benchmarks.workload import (
    TaskSpec,
    Workload,
    one_task_per_method,
    round_robin_workload,
    shuffled_workload,
    task_mix,
    write_classify_tasks,
    write_encoder_backbone,
)

SECTIONS = ("mixed", "peft")


@dataclass(frozen=True, slots=True)
class Plan:
    preset: str
    num_tasks: int  # cycling through prompt tuning, P-tuning and prefix tuning
    num_virtual_tokens: int
    input_chars: tuple[int, int]  # byte tokenizer: tokens = chars + 2 (<s>, </s>)
    requests_per_task: int  # in both comparisons
    max_batch_size: int
    repeats: int
    mixed_repeats: int  # its ratio is near 1: more pairs for a steadier median


QUICK = Plan(
    preset="cpu-classify",
    num_tasks=12,
    num_virtual_tokens=16,
    input_chars=(8, 128),
    requests_per_task=4,
    max_batch_size=32,
    repeats=3,
    mixed_repeats=5,
)
FULL = replace(QUICK, requests_per_task=16, repeats=5, mixed_repeats=7)


def build_plan(args: argparse.Namespace) -> Plan:
    plan = replace(QUICK if args.quick else FULL, preset=args.preset)
    if args.repeats:
        plan = replace(plan, repeats=args.repeats, mixed_repeats=args.repeats)
    if args.requests_per_task:
        plan = replace(plan, requests_per_task=args.requests_per_task)
    return plan


def inputs_per_s(run: ClassifyRun | PeftClassifyRun) -> float:
    return run.inputs_per_s


def inputs_per_cpu_s(run: ClassifyRun | PeftClassifyRun) -> float:
    return run.inputs_per_cpu_s


# ---- the comparisons


def mixed_over_uniform(rig: EngineRig, tasks: list[TaskSpec], plan: Plan, rng: random.Random) -> dict[str, Any]:
    mixed = round_robin_workload(rng, tasks, plan.requests_per_task, plan.input_chars, 0)
    uniform = one_task_per_method(mixed, tasks)
    run_mixed, run_uniform = (lambda: rig.classify(mixed)), (lambda: rig.classify(uniform))
    paired = alternate("mixed", run_mixed, "uniform", run_uniform, inputs_per_s, plan.mixed_repeats, progress=log)
    return {
        **paired.summary("inputs_per_s"),
        "ratio_cpu_time": paired.rescored(inputs_per_cpu_s).ratio,
        "definition": (
            f"mixed: {len(mixed.jobs)} classification requests of one input, cycling through {len(tasks)} tasks "
            f"({task_mix(tasks)}, {plan.num_virtual_tokens} virtual tokens each), all queued at once; uniform: the "
            "same requests, each on the first task of its own kind, so rows, kinds and virtual-token counts are "
            f"identical and only the number of distinct tasks differs ({len(tasks)} against "
            f"{len(set(job.task_id for job in uniform.jobs))}); {engine_notes(rig)}"
        ),
        "steps": step_notes(paired.runs_a),
        "workload": workload_notes(mixed, len(tasks)),
    }


def engine_over_peft(
    rig: EngineRig, peft: PeftClassifier, tasks: list[TaskSpec], plan: Plan, rng: random.Random
) -> dict[str, Any]:
    workload = shuffled_workload(rng, tasks, plan.requests_per_task, plan.input_chars, 0)
    paired = alternate(
        "engine",
        lambda: rig.classify(workload),
        "peft",
        lambda: peft.run(workload),
        inputs_per_s,
        plan.repeats,
        progress=log,
    )
    return {
        **paired.summary("inputs_per_s"),
        "ratio_cpu_time": paired.rescored(inputs_per_cpu_s).ratio,
        "agreement": agreement(paired.runs_a[-1].probs, paired.runs_b[-1].probs),
        "num_tokens": {  # what each side computed: the engine packs rows, PEFT pads each task's batch
            "engine": paired.runs_a[-1].steps.num_prefill_tokens,
            "peft": paired.runs_b[-1].num_tokens,
        },
        "definition": (
            f"{len(workload.jobs)} requests of one input over {len(tasks)} tasks ({plan.requests_per_task} each, "
            f"shuffled); engine: {engine_notes(rig)}; PEFT: one PeftModel per kind over one shared "
            "AutoModelForSequenceClassification, load_adapter per task; per task, set_adapter and one "
            f"{peft.padding_side}-padded forward of its inputs, tasks one after another (prefix tasks: what PEFT's "
            "prefix forward would run, the head model with the task's prefix as its cache)"
        ),
        "steps": step_notes(paired.runs_a),
        "workload": workload_notes(workload, len(tasks)),
    }


def engine_notes(rig: EngineRig) -> str:
    config = rig.engine.scheduler.config
    return f"max_batch_size {config.max_batch_size}, max_batch_tokens {config.max_step_tokens} (the server's default)"


def agreement(engine_probs: list[torch.Tensor], peft_probs: list[torch.Tensor]) -> dict[str, float]:
    """The two sides compute the same thing: each input's probabilities, the engine's against PEFT's."""
    same = [int(a.argmax()) == int(b.argmax()) for a, b in zip(engine_probs, peft_probs, strict=True)]
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(engine_probs, peft_probs, strict=True))
    return {"same_label_rate": sum(same) / len(same), "max_abs_prob_diff": diff}


def step_notes(runs: list[ClassifyRun]) -> dict[str, float]:
    """The engine's steps (medians over runs): every classification step is a prefill of whole rows."""

    def median(field: str) -> float:
        return statistics.median(getattr(run.steps, field) for run in runs)

    num_steps = median("num_prefill_steps")
    return {
        "step_s": median("prefill_s"),
        "num_steps": num_steps,
        "num_tokens": median("num_prefill_tokens"),  # virtual + input tokens
        "rows_per_step": runs[0].num_inputs / num_steps,
    }


def workload_notes(workload: Workload, num_tasks: int) -> dict[str, Any]:
    tokens = [len(job.text) + 2 for job in workload.jobs]
    return {
        "num_requests": len(workload.jobs),
        "num_tasks": num_tasks,
        "input_tokens_min_mean_max": [min(tokens), statistics.mean(tokens), max(tokens)],
        "num_input_tokens": sum(tokens),
    }


# ---- main (called by benchmarks.offline.main, which parses the arguments and sets torch up)


def run(args: argparse.Namespace, sections: set[str], root: Path) -> int:
    started = time.perf_counter()
    plan = build_plan(args)
    rng = random.Random(args.seed)
    dtype = run_dtype(args.device, args.dtype)
    log(f"writing a random {plan.preset} encoder and {plan.num_tasks} PEFT SEQ_CLS tasks to {root}")
    backbone_dir = write_encoder_backbone(plan.preset, root / "backbone", seed=args.seed)
    tasks = write_classify_tasks(backbone_dir, root / "tasks", plan.num_tasks, plan.num_virtual_tokens)
    rig = EngineRig.open(backbone_dir, root / "store", tasks, args.device, dtype, plan.max_batch_size)
    result = new_result(rig.backbone, args.quick, plan, started)
    if "mixed" in sections:
        log("mixed_over_uniform")
        result["details"]["mixed_over_uniform"] = mixed_over_uniform(rig, tasks, plan, rng)
    if "peft" in sections:
        log("engine_over_peft")
        peft = PeftClassifier(backbone_dir, tasks, args.device, dtype)
        result["details"]["engine_over_peft"] = engine_over_peft(rig, peft, tasks, plan, rng)
    return finish(result, args.json, started)
