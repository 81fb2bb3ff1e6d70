"""`python -m benchmarks`: the engine's ratios on a synthetic Llama, measured in one process, A B A B.

mixed_over_uniform      one task per row vs. the same rows on one task per method
engine_over_peft        the engine vs. PEFT generate per task (one PeftModel per method, set_adapter per task)
engine_over_hand_batch  the engine vs. the best a user can write by hand: static batches of mixed tasks, each one
                        padded generate(inputs_embeds=...) of the backbone, prompts and stacked prefixes from PEFT's
                        get_prompt (benchmarks/hand_batch.py)
continuous_over_static  continuous batching vs. static batches, varied output lengths, Poisson arrivals
kv_held_over_ideal      KV bytes of 32 running rows of one task with 128 virtual tokens, over the ideal
tasks                   throughput against the number of distinct tasks, ours beside PEFT's (and a PNG)
memory                  bytes per task; RSS growth of 1,000 resident prompt tasks over their tensor bytes

`--preset cpu-t5` runs the first two on a random T5 v1.1 with T5-style prompt tuning (PEFT SEQ_2_SEQ_LM tasks, the
prompt before the encoder's input): mixed is one prompt task per row against every row on one task, and PEFT runs
its seq2seq `generate` per task. `--preset cpu-classify` runs the first two as classification on a random BERT-shaped
encoder with PEFT SEQ_CLS tasks of three kinds, in inputs per second (benchmarks/classification.py). `--preset
cpu-lora` runs PEFT LoRA tasks on the `cpu` Llama against PEFT's two ways of serving them (benchmarks/lora.py). The
other sections are Llama-only.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from benchmarks import classification, lora, memory
from benchmarks.compare import alternate
from benchmarks.engine_runs import CONTINUOUS, STATIC, EngineRig, RunResult
from benchmarks.hand_batch import HandBatch
from benchmarks.kv_sharing import kv_held_over_ideal
from benchmarks.notes import match_rates, step_notes, tokens_per_cpu_s, tokens_per_s, workload_notes
from benchmarks.peft_baseline import PeftServer
from benchmarks.report import finish, log, new_result, run_dtype, with_overrides
from benchmarks.task_sweep import plot, throughput_by_tasks
from benchmarks.workload import (
    CLASSIFY_PRESETS,
    LORA_PRESETS,
    PREFIX,
    PRESETS,
    PROMPT,
    SEQ2SEQ_PRESETS,
    TaskSpec,
    Workload,
    is_classify,
    is_lora,
    is_seq2seq,
    methods_of,
    one_task_per_method,
    poisson_arrivals,
    round_robin_workload,
    shuffled_workload,
    task_mix,
    varied_output_workload,
    with_arrivals,
    write_backbone,
    write_tasks,
)

SECTIONS = ("mixed", "peft", "hand", "static", "kv", "tasks", "memory")
SEQ2SEQ_SECTIONS = ("mixed", "peft")  # the hand-written batch is a causal LM's (a T5's prompt goes to its encoder)


@dataclass(frozen=True, slots=True)
class Plan:
    preset: str
    num_tasks: int  # half prompt tuning, half prefix tuning (seq2seq: all prompt tuning); one row per task in mixed
    num_virtual_tokens: int
    input_chars: tuple[int, int]  # byte tokenizer: tokens = chars + 1 (<s>; T5: </s>)
    new_tokens: int  # per request, for the mixed and PEFT comparisons
    mixed_requests_per_task: int
    peft_num_tasks: int
    peft_requests_per_task: int
    peft_max_batch_size: int
    static_num_requests: int
    static_new_tokens: tuple[int, int]
    static_load: float  # Poisson arrival rate, as a multiple of the measured continuous capacity
    repeats: int
    mixed_repeats: int  # its runs are short and its ratio is near 1: more pairs for a steadier median
    memory_num_tasks: int
    sweep_task_counts: tuple[int, ...]  # distinct tasks in each load of the sweep
    sweep_num_requests: int


QUICK = Plan(
    preset="cpu",
    num_tasks=16,
    num_virtual_tokens=16,
    input_chars=(8, 64),
    new_tokens=32,
    mixed_requests_per_task=2,
    peft_num_tasks=16,
    peft_requests_per_task=4,
    peft_max_batch_size=32,
    static_num_requests=48,
    static_new_tokens=(4, 64),
    static_load=4.0,
    repeats=3,
    mixed_repeats=5,
    memory_num_tasks=1000,
    sweep_task_counts=(1, 2, 4, 8, 16),
    sweep_num_requests=32,
)
FULL = replace(
    QUICK,
    num_tasks=32,
    input_chars=(8, 128),
    new_tokens=48,
    mixed_requests_per_task=3,
    static_num_requests=128,
    static_new_tokens=(8, 128),
    repeats=5,
    mixed_repeats=7,
    sweep_task_counts=(1, 2, 4, 8, 16, 32, 64),
    sweep_num_requests=64,
)


# ---- mixed over uniform


def mixed_over_uniform(rig: EngineRig, tasks: list[TaskSpec], plan: Plan, rng: random.Random) -> dict[str, Any]:
    mixed = round_robin_workload(rng, tasks, plan.mixed_requests_per_task, plan.input_chars, plan.new_tokens)
    uniform = one_task_per_method(mixed, tasks)
    rig.set_max_batch_size(plan.num_tasks)
    run_mixed, run_uniform = (lambda: rig.run(mixed)), (lambda: rig.run(uniform))
    paired = alternate("mixed", run_mixed, "uniform", run_uniform, tokens_per_s, plan.mixed_repeats, progress=log)
    first_tasks = ", ".join(f"one {method.split('_')[0]} task" for method in methods_of(tasks))
    return {
        **paired.summary("tokens_per_s"),
        "ratio_cpu_time": paired.rescored(tokens_per_cpu_s).ratio,
        "definition": (
            f"mixed: batches of {plan.num_tasks} rows, every row a different task ({task_mix(tasks)}, "
            f"{plan.num_virtual_tokens} virtual tokens each); uniform: the same requests, each on the first task of "
            f"its own method ({first_tasks}), so rows, methods and virtual-token counts are identical and only the "
            "number of distinct tasks differs"
        ),
        "steps": step_notes(paired.runs_a),
        "workload": workload_notes(mixed, plan.num_tasks),
    }


# ---- engine over PEFT


def engine_over_peft(
    rig: EngineRig, peft: PeftServer, tasks: list[TaskSpec], plan: Plan, rng: random.Random
) -> dict[str, Any]:
    chosen = tasks[: plan.peft_num_tasks]
    workload = shuffled_workload(rng, chosen, plan.peft_requests_per_task, plan.input_chars, plan.new_tokens)
    return {
        **engine_against(rig, "peft", lambda: peft.run(workload), workload, chosen, plan),
        "definition": (
            f"{len(workload.jobs)} requests over {len(chosen)} tasks ({plan.peft_requests_per_task} each, shuffled); "
            f"engine: max_batch_size {plan.peft_max_batch_size}, every request queued at t=0; PEFT: one PeftModel "
            f"per method over one shared base, load_adapter per task; per task, set_adapter and one "
            f"{peft.padding_side}-padded greedy generate of its requests, tasks one after another"
        ),
        "match_note": SEQ2SEQ_MATCH_NOTE if peft.seq2seq else CAUSAL_MATCH_NOTE,
    }


def engine_against(
    rig: EngineRig,
    name: str,
    baseline: Callable[[], Any],
    workload: Workload,
    chosen: list[TaskSpec],
    plan: Plan,
    batches_mix_tasks: bool = False,
) -> dict[str, Any]:
    """The engine (max_batch_size `peft_max_batch_size`) against a baseline on one workload, A B A B: the ratio in
    wall and CPU time, how often their greedy outputs agree, the engine's steps and the workload. `batches_mix_tasks`:
    the baseline pads by the batch, not by the task, so a task's longest input tells nothing of its padding."""
    rig.set_max_batch_size(plan.peft_max_batch_size)
    paired = alternate("engine", lambda: rig.run(workload), name, baseline, tokens_per_s, plan.repeats, progress=log)
    method_of = {t.task_id: t.method for t in chosen}
    matches = [a == b for a, b in zip(paired.runs_a[-1].token_ids, paired.runs_b[-1].token_ids, strict=True)]
    rates = match_rates(workload, matches, method_of)
    if batches_mix_tasks:
        del rates["match_rate_unpadded_rows"]
    return {
        **paired.summary("tokens_per_s"),
        "ratio_cpu_time": paired.rescored(tokens_per_cpu_s).ratio,
        **rates,
        "steps": step_notes(paired.runs_a),
        "workload": workload_notes(workload, len(chosen)),
    }


# ---- engine over the hand-written mixed batch


def engine_over_hand_batch(
    rig: EngineRig, hand: HandBatch, tasks: list[TaskSpec], plan: Plan, rng: random.Random
) -> dict[str, Any]:
    chosen = tasks[: plan.peft_num_tasks]
    workload = shuffled_workload(rng, chosen, plan.peft_requests_per_task, plan.input_chars, plan.new_tokens)
    batch_size = plan.peft_max_batch_size
    return {
        **engine_against(rig, "hand", lambda: hand.run(workload, batch_size), workload, chosen, plan, True),
        "definition": (
            f"{len(workload.jobs)} requests over {len(chosen)} tasks ({plan.peft_requests_per_task} each, shuffled); "
            f"engine: max_batch_size {batch_size}, every request queued at t=0; by hand: the requests in arrival "
            f"order, {batch_size} at a time, each batch ONE left-padded greedy generate(inputs_embeds=...) of the "
            "backbone that runs to its end: each task's virtual tokens from PEFT's get_prompt once, prompt "
            "embeddings before a row's token embeddings, prefix keys and values stacked per row into one DynamicCache"
        ),
        "match_note": "greedy tokens equal the engine's wherever a row's rounding agrees (padding changes the "
        "batch's arithmetic, not the positions)",
    }


CAUSAL_MATCH_NOTE = (
    "PEFT's prompt-tuning generate drops position ids, so a left-padded prompt-tuning row sees its virtual "
    "tokens at other positions than when alone; a task's longest input is not padded in PEFT's batch"
)
SEQ2SEQ_MATCH_NOTE = (
    "PEFT's seq2seq generate puts the task's first P prompt rows before the encoder's input embeddings, the "
    "engine likewise per row; PEFT pads on the right, after each row's text"
)


# ---- continuous over static


def continuous_over_static(rig: EngineRig, tasks: list[TaskSpec], plan: Plan, rng: random.Random) -> dict[str, Any]:
    at_once = varied_output_workload(rng, tasks, plan.static_num_requests, plan.input_chars, plan.static_new_tokens)
    rig.set_max_batch_size(plan.num_tasks)
    calibration = rig.run(at_once)  # also the warm-up
    rate = plan.static_load * len(at_once.jobs) / calibration.seconds
    workload = with_arrivals(at_once, poisson_arrivals(rng, len(at_once.jobs), rate))
    paired = alternate(
        "continuous",
        lambda: rig.run(workload, CONTINUOUS),
        "static",
        lambda: rig.run(workload, STATIC),
        tokens_per_s,
        plan.repeats,
        warmup=0,
        progress=log,
    )
    low, high = plan.static_new_tokens
    return {
        **paired.summary("tokens_per_s"),
        "definition": (
            f"{len(workload.jobs)} requests, {low}-{high} new tokens each (uniform), tasks drawn uniformly from "
            f"{len(tasks)}, Poisson arrivals at {rate:.2f} req/s ({plan.static_load:g}x the continuous capacity "
            f"measured with everything queued at t=0); max_batch_size {plan.num_tasks}; throughput = generated "
            "tokens / time until the last request ends. static: whatever has arrived (up to max_batch_size) runs on "
            "the same engine until its last row ends, then the next batch; finished rows leave the static batch "
            "(no compute is spent on them), which flatters static batching"
        ),
        "latency": {"continuous": latency_stats(paired.runs_a), "static": latency_stats(paired.runs_b)},
        "steps": {"continuous": step_notes(paired.runs_a), "static": step_notes(paired.runs_b)},
        "arrival_rate_per_s": rate,
        "workload": workload_notes(workload, len(tasks)),
    }


def latency_stats(runs: list[RunResult]) -> dict[str, float]:
    """Per-run percentiles, then the median over runs."""

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]

    return {
        "ttft_p50": statistics.median(pct(run.ttft_s, 50) for run in runs),
        "ttft_p90": statistics.median(pct(run.ttft_s, 90) for run in runs),
        "latency_p50": statistics.median(pct(run.latency_s, 50) for run in runs),
        "latency_p90": statistics.median(pct(run.latency_s, 90) for run in runs),
    }


# ---- memory


def task_memory(rig: EngineRig, tasks: list[TaskSpec], plan: Plan, root: Path) -> dict[str, Any]:
    fp, device, dtype = rig.backbone.fingerprint, rig.backbone.device, rig.backbone.dtype
    samples = [next(t for t in tasks if t.method == method) for method in (PROMPT, PREFIX)]
    per_task = memory.per_task_bytes(fp, device, dtype, samples, root / "store-sizes")
    resident = memory.resident_task_growth(fp, device, dtype, samples[0], root / "store-memory", plan.memory_num_tasks)
    return {"per_task": per_task, "resident": resident}


# ---- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA) | float32 | ...")
    parser.add_argument(
        "--preset",
        choices=(*PRESETS, *SEQ2SEQ_PRESETS, *CLASSIFY_PRESETS, *LORA_PRESETS),
        help=f"backbone size (default: by device); {', '.join(SEQ2SEQ_PRESETS)}: a T5 with prompt tuning, sections "
        f"{','.join(SEQ2SEQ_SECTIONS)} only; {', '.join(CLASSIFY_PRESETS)}: classification on a BERT-shaped encoder "
        "with prompt-tuning, P-tuning and prefix-tuning (P-Tuning v2) SEQ_CLS tasks, mixed over uniform and the engine "
        f"over PEFT's per-task forward in inputs/s, sections {','.join(classification.SECTIONS)} only; "
        f"{', '.join(LORA_PRESETS)}: 16 PEFT LoRA tasks on the cpu Llama, mixed over uniform, the engine over PEFT "
        f"per adapter and over PEFT's mixed adapter_names= batch, LoRA + prompt + prefix rows mixed over uniform, "
        f"sections {','.join(lora.SECTIONS)} only",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default: 1; 0 leaves torch's default). One thread keeps runs steady on a "
        "shared machine (two threads on two busy cores slow small-batch forwards many times over) and makes the "
        "CPU-time ratios meaningful",
    )
    parser.add_argument("--repeats", type=int, help="measured runs per side (after one warm-up)")
    parser.add_argument("--new-tokens", type=int, help="tokens per request in the mixed and PEFT comparisons")
    parser.add_argument(
        "--requests-per-task", type=int, help="requests per task in the PEFT comparison (classification: in both)"
    )
    parser.add_argument("--only", help=f"comma-separated sections to run, of {','.join(SECTIONS)} (or a preset's own)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--workdir", type=Path, help="keep the backbone, tasks and stores here (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    preset = args.preset or ("gpu" if args.device.startswith("cuda") else "cpu")
    return with_overrides(replace(plan, preset=preset), args)


def quiet_libraries() -> None:
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Position ids are not supported")
    logging.basicConfig(level=logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = build_plan(args)
    allowed, backbone = sections_of(plan.preset)
    sections = set(args.only.split(",")) if args.only else set(allowed)
    if not sections <= set(allowed):
        log(f"--preset {plan.preset}: only {','.join(allowed)} run on {backbone}")
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="promptserve-bench-") as scratch:
        root = args.workdir or Path(scratch)
        if is_classify(plan.preset):
            return classification.run(args, sections, root)
        if is_lora(plan.preset):
            return lora.run(args, sections, root)
        return run(args, plan, sections, root)


def sections_of(preset: str) -> tuple[tuple[str, ...], str]:
    """The sections a preset can run, and its backbone in words."""
    if is_classify(preset):
        return classification.SECTIONS, "an encoder"
    if is_seq2seq(preset):
        return SEQ2SEQ_SECTIONS, "a seq2seq backbone"
    if is_lora(preset):
        return lora.SECTIONS, "the LoRA preset"
    return SECTIONS, "a causal backbone"


def run(args: argparse.Namespace, plan: Plan, sections: set[str], root: Path) -> int:
    started = time.perf_counter()
    rng = random.Random(args.seed)
    dtype = run_dtype(args.device, args.dtype)
    seq2seq = is_seq2seq(plan.preset)
    log(f"writing a random {plan.preset} {'T5' if seq2seq else 'Llama'} and {plan.num_tasks} PEFT tasks to {root}")
    backbone_dir = write_backbone(plan.preset, root / "backbone", seed=args.seed)
    tasks = write_tasks(backbone_dir, root / "tasks", plan.num_tasks, plan.num_virtual_tokens, seq2seq=seq2seq)
    rig = EngineRig.open(backbone_dir, root / "store", tasks, args.device, dtype, plan.num_tasks)
    result = new_result(rig.backbone, args.quick, plan, started)
    if "mixed" in sections:
        log("mixed_over_uniform")
        result["details"]["mixed_over_uniform"] = mixed_over_uniform(rig, tasks, plan, rng)
    if "peft" in sections:
        log("engine_over_peft")
        peft = PeftServer(backbone_dir, tasks[: plan.peft_num_tasks], args.device, dtype)
        result["details"]["engine_over_peft"] = engine_over_peft(rig, peft, tasks, plan, rng)
        del peft
    if "hand" in sections:
        log("engine_over_hand_batch")
        hand = HandBatch(backbone_dir, tasks[: plan.peft_num_tasks], args.device, dtype)
        result["details"]["engine_over_hand_batch"] = engine_over_hand_batch(rig, hand, tasks, plan, rng)
        del hand
    if "static" in sections:
        log("continuous_over_static")
        result["details"]["continuous_over_static"] = continuous_over_static(rig, tasks, plan, rng)
    if "kv" in sections:
        log("kv_held_over_ideal")
        result["details"]["kv_held_over_ideal"] = kv_held_over_ideal(rig, backbone_dir, root, rng)
    if "tasks" in sections:
        log("throughput_by_tasks")
        result["throughput_by_tasks"] = task_sweep(args, plan, rig, backbone_dir, root, dtype, rng)
    if "memory" in sections:
        log("memory")
        result["memory"] = task_memory(rig, tasks, plan, root)
        result["rss_growth_over_tensor_bytes"] = result["memory"]["resident"]["rss_growth_over_tensor_bytes"]
    return finish(result, args.json, started)


def task_sweep(
    args: argparse.Namespace, plan: Plan, rig: EngineRig, backbone_dir: Path, root: Path, dtype: str, rng: random.Random
) -> dict[str, Any]:
    """As many tasks as the sweep's largest count, registered beside the others; the PNG goes next to the JSON."""
    count = max(plan.sweep_task_counts)
    tasks = write_tasks(backbone_dir, root / "sweep-tasks", count, plan.num_virtual_tokens, prefix="sweep")
    for task in tasks:
        rig.store.register_dir(task.task_id, task.adapter_dir)
    peft = PeftServer(backbone_dir, tasks, args.device, dtype)
    sweep = throughput_by_tasks(
        rig, peft, tasks, list(plan.sweep_task_counts), plan.sweep_num_requests, plan.input_chars, 32, rng
    )
    if args.json:
        title = f"{rig.backbone.fingerprint.num_layers}-layer {plan.preset} Llama, {rig.backbone.device}"
        png = plot(sweep, args.json.with_suffix(".png"), title)
        sweep["png"] = str(png) if png else "matplotlib not installed: pip install -e '.[plot]'"
    return sweep
