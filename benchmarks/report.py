"""The machine a run came from, the readable table of ratios, and the JSON file."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import peft
import torch
import transformers

from server.engine.backbone import Backbone


def log(message: str) -> None:
    """Progress, on stderr: stdout holds the table."""
    print(message, file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "load_average_at_start": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def backbone_summary(backbone: Backbone) -> dict[str, Any]:
    num_params = sum(p.numel() for p in backbone.model.parameters())
    return {**asdict(backbone.fingerprint), "num_parameters": num_params, "onednn_linears": backbone.onednn_linears}


GOALS = {  # name -> (limit, goal, higher_is_better)
    "mixed_over_uniform": (1.0, 0.97, True),
    "engine_over_peft": (None, 3.0, True),
    "engine_over_hand_batch": (None, 1.0, True),  # what batching alone cannot give: continuous rows, no padding
    "continuous_over_static": (None, 1.3, True),
    "kv_held_over_ideal": (None, 1.1, False),
    "rss_growth_over_tensor_bytes": (None, 1.1, False),
    "lora_mixed_over_uniform": (1.0, 0.9, True),  # a LoRA delta costs arithmetic per row, mixed or not
    "lora_engine_over_peft": (None, 2.5, True),  # on this CPU the arithmetic caps such ratios near 3
    "lora_engine_over_peft_mixed": (None, 1.3, True),
    "lora_engine_over_peft_onednn": (None, 2.5, True),  # the strongest PEFT: its layers on the engine's CPU kernels
    "kinds_mixed_over_uniform": (1.0, 0.9, True),
    "lora_memory_over_tensor_bytes": (None, 1.1, False),
}


def run_dtype(device: str, dtype: str) -> str:
    """The benchmark's dtype: bfloat16 on a GPU and float32 on a CPU unless one is asked for."""
    return dtype if dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")


def with_overrides(plan: Any, args: argparse.Namespace) -> Any:
    """A generation preset's plan (a dataclass) with the command line's --repeats, --new-tokens and
    --requests-per-task (the PEFT comparison's) applied."""
    if args.repeats:
        plan = replace(plan, repeats=args.repeats, mixed_repeats=args.repeats)
    if args.new_tokens:
        plan = replace(plan, new_tokens=args.new_tokens)
    if args.requests_per_task:
        plan = replace(plan, peft_requests_per_task=args.requests_per_task)
    return plan


def new_result(backbone: Backbone, quick: bool, plan: Any, started: float) -> dict[str, Any]:
    """A run's result before its sections: the machine and the configuration (`plan` a dataclass)."""
    log(f"set up in {time.perf_counter() - started:.0f} s")
    return {
        "machine": machine_info(backbone.device, backbone.dtype),
        "config": {"quick": quick, **asdict(plan), "backbone": backbone_summary(backbone)},
        "details": {},
    }


def finish(result: dict[str, Any], json_path: Path | None, started: float) -> int:
    """Each section's ratio at the top level, the goals, the table; the JSON when asked for."""
    for name, detail in result["details"].items():
        result[name] = detail["ratio"]
    result["goals"] = goals(result)
    result["machine"]["load_average_at_end"] = load_average()
    result["seconds"] = time.perf_counter() - started
    print_table(result)
    print(f"  {result['seconds']:.0f} s in all")
    if json_path:
        write_json(result, json_path)
        print(f"  wrote {json_path}")
    return 0


def goals(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """For the JSON: each measured figure against its goal."""
    out = {}
    for name, (_, goal, higher) in GOALS.items():
        if name in result:
            value = result[name]
            out[name] = {
                "value": value,
                "goal": goal,
                "higher_is_better": higher,
                "met": bool(value >= goal if higher else value <= goal),
            }
    return out


def verdict(name: str, value: float) -> str:
    _, goal, higher = GOALS[name]
    met = value >= goal if higher else value <= goal
    return f"{'>=' if higher else '<='} {goal:g}: {'met' if met else 'NOT met'}"


RATIOS = (
    "mixed_over_uniform",
    "engine_over_peft",
    "engine_over_hand_batch",
    "continuous_over_static",
    "lora_mixed_over_uniform",
    "lora_engine_over_peft",
    "lora_engine_over_peft_mixed",
    "lora_engine_over_peft_onednn",
    "kinds_mixed_over_uniform",
)
ARCH_NAMES = {"llama": "Llama", "t5": "T5 v1.1", "bert": "BERT-shaped encoder"}


def print_table(result: dict[str, Any]) -> None:
    m, config = result["machine"], result["config"]
    print()
    print(f"promptserve benchmarks ({'quick' if config['quick'] else 'full'} run)")
    cpus = f"{m['cpus_usable']} of {m['cpu_count']} CPUs usable"
    print(f"  machine: {m['cpu']}, {cpus}, {m['torch_threads']} torch threads")
    print(f"  torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, python {m['python']}")
    backbone = config["backbone"]
    arch, layers = ARCH_NAMES.get(backbone["model_type"], backbone["model_type"]), str(backbone["num_layers"])
    if backbone.get("num_decoder_layers"):  # an encoder-decoder: encoder + decoder layers
        layers += f"+{backbone['num_decoder_layers']}"
    print(
        f"  device {m['device']} ({m.get('gpu', 'CPU')}), {m['dtype']}; backbone: random {arch} "
        f"'{config['preset']}' preset, {backbone['num_parameters'] / 1e6:.1f}M parameters, "
        f"{layers} layers, {backbone['num_attention_heads']}/{backbone['num_key_value_heads']} heads"
    )
    print(f"  load average at start {m['load_average_at_start']}, at end {m.get('load_average_at_end')}")
    print()
    print(f"  {'':30} {'ratio':>7} {'pairs min..max':>15} {'cpu-time':>9}   goal")
    for name in RATIOS:
        if name in result:
            detail = result["details"][name]
            spread = f"{detail['pair_ratio_min']:.2f}..{detail['pair_ratio_max']:.2f}"
            cpu = f"{detail['ratio_cpu_time']:.3f}" if "ratio_cpu_time" in detail else "-"
            print(f"  {name:30} {result[name]:7.3f} {spread:>15} {cpu:>9}   {verdict(name, result[name])}")
    for name in ("kv_held_over_ideal", GROWTH, LORA_MEMORY):
        if name in result:
            print(f"  {name:30} {result[name]:7.3f} {'':>15} {'':>9}   {verdict(name, result[name])}")
    print()
    for name in RATIOS:
        if name in result:
            print_detail(name, result["details"][name])
    if "kv_held_over_ideal" in result:
        kv = result["details"]["kv_held_over_ideal"]
        copies = kv["per_row_copies_over_ideal"]
        print(f"  kv_held_over_ideal: {kv['definition']}; with a copy of the prefix per row: {copies:.2f}")
        print()
    if "throughput_by_tasks" in result:
        print_sweep(result["throughput_by_tasks"])
    if "memory" in result:
        print_memory(result["memory"])
    if "lora_memory" in result:
        print_lora_memory(result["lora_memory"])


GROWTH = "rss_growth_over_tensor_bytes"
LORA_MEMORY = "lora_memory_over_tensor_bytes"


def print_detail(name: str, detail: dict[str, Any]) -> None:
    rates = {key: value for key, value in detail.items() if key.endswith("_per_s")}
    print(f"  {name}: " + ", ".join(f"{key} {value:.1f}" for key, value in rates.items()))
    print(f"    {detail['definition']}")
    if "agreement" in detail:
        same, diff = detail["agreement"]["same_label_rate"], detail["agreement"]["max_abs_prob_diff"]
        print(f"    same top label as PEFT's: {same:.2f} of inputs; largest probability difference {diff:.1e}")
    if "num_tokens" in detail:
        ours, peft = detail["num_tokens"]["engine"], detail["num_tokens"]["peft"]
        print(f"    positions computed (virtual tokens included): engine {ours:,}, PEFT {peft:,} (x{peft / ours:.2f})")
    if "match_rate" in detail:
        by_method = ", ".join(f"{k} {v:.2f}" for k, v in detail["match_rate_by_method"].items())
        unpadded = detail.get("match_rate_unpadded_rows")  # PEFT's per-task batches: a task's longest input
        unpadded_note = "" if unpadded is None else f"; rows unpadded in the baseline's batch {unpadded:.2f}"
        print(
            f"    greedy outputs identical to the baseline's: {detail['match_rate']:.2f} of requests "
            f"({by_method}{unpadded_note})"
        )
    if "latency" in detail:
        for side, stats in detail["latency"].items():
            print(f"    {side}: " + ", ".join(f"{key} {value:.2f}s" for key, value in stats.items()))
    print()


def print_sweep(sweep: dict[str, Any]) -> None:
    print(f"  throughput_by_tasks: {sweep['definition']}")
    print(f"    {'tasks':>6} {'engine tok/s':>13} {'PEFT tok/s':>11} {'ratio':>6}")
    for p in sweep["points"]:
        ratio = p["engine_tokens_per_s"] / p["peft_tokens_per_s"]
        print(f"    {p['num_tasks']:6d} {p['engine_tokens_per_s']:13.1f} {p['peft_tokens_per_s']:11.1f} {ratio:6.2f}")
    if "png" in sweep:
        print(f"    picture: {sweep['png']}")
    print()


def print_memory(memory: dict[str, Any]) -> None:
    for method, sizes in memory["per_task"].items():
        print(
            f"  one {method} task ({sizes['num_virtual_tokens']} virtual tokens): tensors {sizes['tensor_bytes']:,} B,"
            f" upload {sizes['upload_bytes']:,} B, on disk {sizes['disk_bytes']:,} B"
            f" ({sizes['disk_allocated_bytes']:,} B in blocks)"
        )
    resident = memory["resident"]
    print(
        f"  {resident['num_tasks']:,} resident prompt tasks: tensors {resident['tensor_bytes'] / 2**20:.1f} MiB, "
        f"RSS +{resident['rss_growth_bytes'] / 2**20:.1f} MiB (x{resident['rss_growth_over_tensor_bytes']:.3f}, "
        f"{resident['overhead_bytes_per_task']:,.0f} B overhead per task; "
        f"x{resident['rss_growth_over_tensor_bytes_untrimmed']:.3f} before malloc_trim); "
        f"register {resident['register_ms_per_task']:.1f} ms/task"
    )
    print()


def print_lora_memory(lora: dict[str, Any]) -> None:
    print(
        f"  {LORA_MEMORY}: {lora['num_tasks']} resident LoRA tasks, {lora['tensor_bytes_per_task'] / 2**20:.2f} MiB "
        f"of tensors each: the adapter pool holds x{lora['pool_bytes_over_tensor_bytes']:.3f} of that; the "
        f"process's RSS grew x{lora['rss_growth_over_tensor_bytes']:.3f} (register {lora['register_ms_per_task']:.1f}"
        " ms/task)"
    )
    print(f"    {lora['definition']}")
    print()


def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
