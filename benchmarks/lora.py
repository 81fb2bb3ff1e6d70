"""`python -m benchmarks --preset cpu-lora`: PEFT LoRA tasks (rank 8 and 16, on the attention or the MLP projections)
on the `cpu` Llama, every figure measured in one process, A B A B.

lora_mixed_over_uniform      rows of 16 LoRA tasks mixed vs the same requests, each on the first task of its shape
lora_engine_over_peft        the engine vs PEFT per adapter: set_adapter and one left-padded generate per task
lora_engine_over_peft_mixed  the engine vs PEFT's own mixed batch: static left-padded batches, adapter_names= per row
lora_engine_over_peft_onednn the engine vs PEFT per adapter, PEFT's base layers on the engine's oneDNN CPU kernels too
kinds_mixed_over_uniform     LoRA, prompt-tuning and prefix-tuning rows mixed vs one task per kind
lora_memory_over_tensor_bytes  the engine's device bytes per resident LoRA task over its tensors' bytes
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import memory
from benchmarks.compare import alternate
from benchmarks.engine_runs import EngineRig, RunResult
from benchmarks.notes import match_rates, step_notes, tokens_per_cpu_s, tokens_per_s, workload_notes
from benchmarks.peft_baseline import PeftRun, PeftServer
from benchmarks.report import finish, log, new_result, run_dtype, with_overrides
from benchmarks.workload import (
    LORA_TARGETS,
    TaskSpec,
    Workload,
    kind_of_task,
    one_task_per_group,
    round_robin_workload,
    shuffled_workload,
    write_backbone,
    write_lora_tasks,
    write_tasks,
)

SECTIONS = ("mixed", "peft", "peft-mixed", "peft-onednn", "kinds", "memory")


@dataclass(frozen=True, slots=True)
class Plan:
    preset: str
    num_tasks: int  # LoRA tasks, cycling through every (rank, targets) pair
    ranks: tuple[int, ...]
    input_chars: tuple[int, int]  # byte tokenizer: tokens = chars + 1 (<s>)
    new_tokens: int  # per request
    mixed_requests_per_task: int  # the mixed comparisons: one row per task in a batch
    peft_requests_per_task: int  # the PEFT comparisons
    peft_max_batch_size: int  # the engine's, and the rows of PEFT's static mixed batches
    num_prompt_tasks: int  # the kinds comparison: half prompt tuning, half prefix tuning, beside the LoRA tasks
    num_virtual_tokens: int
    repeats: int
    mixed_repeats: int  # its ratio is near 1: more pairs for a steadier median
    memory_num_tasks: int  # LoRA tasks made resident at once in the memory figure
    max_loras: int  # the engine's: resident LoRA tasks at most (the 16 above, and the memory figure's)
    adapter_cache_bytes: int  # the engine's adapter pool


QUICK = Plan(
    preset="cpu-lora",
    num_tasks=16,
    ranks=(8, 16),
    input_chars=(8, 64),
    new_tokens=32,
    mixed_requests_per_task=2,
    peft_requests_per_task=4,
    peft_max_batch_size=32,
    num_prompt_tasks=8,
    num_virtual_tokens=16,
    repeats=3,
    mixed_repeats=5,
    memory_num_tasks=64,
    max_loras=96,
    adapter_cache_bytes=1 << 30,
)
FULL = replace(QUICK, input_chars=(8, 128), new_tokens=48, mixed_requests_per_task=3, repeats=5, mixed_repeats=7)


def build_plan(args: argparse.Namespace) -> Plan:
    return with_overrides(replace(QUICK if args.quick else FULL, preset=args.preset), args)


# ---- mixed over uniform: LoRA tasks alone, and every kind together


def mixed_over_uniform(
    rig: EngineRig, tasks: list[TaskSpec], plan: Plan, rng: random.Random, what: str
) -> dict[str, Any]:
    """Batches of one row per task against the same requests on the first task of each kind (method, and a LoRA
    task's rank and targets): the same rows and arithmetic, and only the number of distinct tasks differs."""
    mixed = round_robin_workload(rng, tasks, plan.mixed_requests_per_task, plan.input_chars, plan.new_tokens)
    uniform = one_task_per_group(mixed, tasks, kind_of_task)
    rig.set_max_batch_size(len(tasks))
    run_mixed, run_uniform = (lambda: rig.run(mixed)), (lambda: rig.run(uniform))
    paired = alternate("mixed", run_mixed, "uniform", run_uniform, tokens_per_s, plan.mixed_repeats, progress=log)
    num_uniform = len({job.task_id for job in uniform.jobs})
    return {
        **paired.summary("tokens_per_s"),
        "ratio_cpu_time": paired.rescored(tokens_per_cpu_s).ratio,
        "definition": (
            f"mixed: batches of {len(tasks)} rows, every row a different task ({what}); uniform: the same requests, "
            f"each on the first task of its own kind ({num_uniform} tasks), so rows and arithmetic are identical and "
            "only the number of distinct tasks differs"
        ),
        "steps": step_notes(paired.runs_a),
        "workload": workload_notes(mixed, len(tasks)),
    }


def lora_mix(tasks: list[TaskSpec]) -> str:
    """E.g. '16 LoRA tasks, 4 each of r8-attention, r8-mlp, r16-attention, r16-mlp (attention: q_proj, ...)'."""
    lora = [task for task in tasks if task.shape]
    shapes = list(dict.fromkeys(task.shape for task in lora))
    targets = "; ".join(f"{name}: {', '.join(modules)}" for name, modules in LORA_TARGETS.items())
    return f"{len(lora)} LoRA tasks, {len(lora) // len(shapes)} each of {', '.join(shapes)} ({targets})"


# ---- the engine over PEFT's two ways of serving LoRA


def engine_over_peft(
    rig: EngineRig, peft: PeftServer, tasks: list[TaskSpec], plan: Plan, workload: Workload, mixed: bool,
    kernels: str = "",
) -> dict[str, Any]:  # fmt: skip
    rig.set_max_batch_size(plan.peft_max_batch_size)
    batch_size = plan.peft_max_batch_size

    def run_peft() -> PeftRun:
        return peft.run_mixed(workload, batch_size) if mixed else peft.run(workload)

    paired = alternate("engine", lambda: rig.run(workload), "peft", run_peft, tokens_per_s, plan.repeats, progress=log)
    shape_of = {task.task_id: task.shape for task in tasks}
    engine_run: RunResult = paired.runs_a[-1]
    matches = [a == b for a, b in zip(engine_run.token_ids, paired.runs_b[-1].token_ids, strict=True)]
    if mixed:
        peft_way = (
            f"the requests in arrival order, {batch_size} at a time, each batch one left-padded greedy generate "
            "that runs to its end, every row with its own adapter (adapter_names=)"
        )
    else:
        peft_way = "per task, set_adapter and one left-padded greedy generate of its requests, tasks one after another"
    return {
        **paired.summary("tokens_per_s"),
        "ratio_cpu_time": paired.rescored(tokens_per_cpu_s).ratio,
        **match_rates(workload, matches, shape_of),
        "definition": (
            f"{len(workload.jobs)} requests over {len(tasks)} LoRA tasks ({plan.peft_requests_per_task} each, "
            f"shuffled); engine: max_batch_size {batch_size}, every request queued at t=0; PEFT: one PeftModel "
            f"holding every task (load_adapter); {peft_way}{kernels}"
        ),
        "match_note": "greedy tokens equal PEFT's wherever a row's rounding agrees; PEFT pads each batch on the left",
        "steps": step_notes(paired.runs_a),
        "workload": workload_notes(workload, len(tasks)),
    }


# ---- main (called by benchmarks.offline.main, which parses the arguments and sets torch up)


def run(args: argparse.Namespace, sections: set[str], root: Path) -> int:
    started = time.perf_counter()
    plan = build_plan(args)
    rng = random.Random(args.seed)
    dtype = run_dtype(args.device, args.dtype)
    log(f"writing a random {plan.preset} Llama and {plan.num_tasks} PEFT LoRA tasks to {root}")
    backbone_dir = write_backbone(plan.preset, root / "backbone", seed=args.seed)
    tasks = write_lora_tasks(backbone_dir, root / "tasks", plan.num_tasks, plan.ranks)
    prompt_tasks = []
    if "kinds" in sections:
        prompt_tasks = write_tasks(backbone_dir, root / "prompt-tasks", plan.num_prompt_tasks, plan.num_virtual_tokens)
    max_rows = max(plan.num_tasks + len(prompt_tasks), plan.peft_max_batch_size)
    pool = {"max_loras": plan.max_loras, "adapter_cache_bytes": plan.adapter_cache_bytes}
    rig = EngineRig.open(backbone_dir, root / "store", [*tasks, *prompt_tasks], args.device, dtype, max_rows, **pool)
    result = new_result(rig.backbone, args.quick, plan, started)
    details = result["details"]
    if "mixed" in sections:
        log("lora_mixed_over_uniform")
        details["lora_mixed_over_uniform"] = mixed_over_uniform(rig, tasks, plan, rng, lora_mix(tasks))
    if {"peft", "peft-mixed", "peft-onednn"} & sections:  # one workload for the three
        workload = shuffled_workload(rng, tasks, plan.peft_requests_per_task, plan.input_chars, plan.new_tokens)
    if {"peft", "peft-mixed"} & sections:
        peft = PeftServer(backbone_dir, tasks, args.device, dtype)
        for section, mixed in (("peft", False), ("peft-mixed", True)):
            if section in sections:
                name = "lora_engine_over_peft_mixed" if mixed else "lora_engine_over_peft"
                log(name)
                details[name] = engine_over_peft(rig, peft, tasks, plan, workload, mixed)
        del peft
    if "peft-onednn" in sections:
        log("lora_engine_over_peft_onednn")
        peft = PeftServer(backbone_dir, tasks, args.device, dtype, linears="onednn")
        kernels = "; its base model's linear layers through oneDNN, as the engine's (server/engine/cpu_linears.py)"
        details["lora_engine_over_peft_onednn"] = engine_over_peft(rig, peft, tasks, plan, workload, False, kernels)
        del peft
    if "kinds" in sections:
        log("kinds_mixed_over_uniform")
        num_prompt = len(prompt_tasks) // 2
        what = f"{lora_mix(tasks)}, {num_prompt} prompt tuning + {num_prompt} prefix tuning tasks"
        interleaved = interleave(tasks, prompt_tasks)
        details["kinds_mixed_over_uniform"] = mixed_over_uniform(rig, interleaved, plan, rng, what)
    if "memory" in sections:
        log("lora_memory_over_tensor_bytes")
        rig.set_max_batch_size(plan.peft_max_batch_size)
        shapes = list({task.shape: task for task in tasks}.values())  # one template of each rank and targets
        result["lora_memory"] = memory.resident_lora_growth(rig, shapes, plan.memory_num_tasks)
        result["lora_memory_over_tensor_bytes"] = result["lora_memory"]["pool_bytes_over_tensor_bytes"]
    return finish(result, args.json, started)


def interleave(first: list[TaskSpec], second: list[TaskSpec]) -> list[TaskSpec]:
    """The two lists' tasks taken in turn (the longer one's rest at the end), so any stretch of a round-robin
    workload holds every kind."""
    merged = [task for pair in zip(first, second, strict=False) for task in pair]
    return merged + first[len(second) :] + second[len(first) :]
