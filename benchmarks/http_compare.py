"""`python -m benchmarks.http_compare`: the mixed 16-task load over HTTP, promptserve against PEFT per-task batches.

Both servers run the same random Llama (the 'cpu' preset) and the same 16 PEFT tasks (8 prompt tuning, 8 prefix
tuning, 16 virtual tokens), with one torch thread each, on this machine; one at a time, alternating A B A B.
`promptserve bench` (benchmarks/serving.py) drives both with the same seeded requests: uniform over the tasks,
every request sent at once (or --concurrency), through POST /v1/generate (whole answers: PEFT's `generate` cannot
stream a batch per token, and a throughput comparison should not charge one side for events). promptserve is
`promptserve serve` as users run it; PEFT is benchmarks/peft_server.py (one adapter per batch, task after task).
The backbone's `</s>` can never win, so every request generates exactly --max-new-tokens on both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import serving
from benchmarks.workload import write_backbone, write_tasks

SERVERS = ("promptserve", "peft")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(
    side: str,
    backbone: Path,
    tasks: Path,
    store: Path,
    port: int,
    batch: int,
    device: str = "cpu",
    dtype: str = "float32",
) -> list[str]:
    placement = ["--device", device, "--dtype", dtype]  # both sides on the same device, in the same dtype
    if side == "promptserve":
        flags = ["--model", str(backbone), "--store", str(store), "--port", str(port), "--no-demo-tasks"]
        return [sys.executable, "-m", "server.cli", "serve", *flags, "--max-batch-size", str(batch), *placement]
    flags = ["--backbone", str(backbone), "--tasks", str(tasks), "--port", str(port), "--max-batch-size", str(batch)]
    return [sys.executable, "-m", "benchmarks.peft_server", *flags, *placement]


def start(command: list[str], url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROMPTSERVE_TORCH_THREADS": "1", "PROMPTSERVE_LOG_LEVEL": "warning"}
    process = subprocess.Popen(command, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[2]} exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/info", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{command[2]} did not answer /info within 300 s; see {log}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def register(url: str, tasks: Path) -> None:
    for adapter_dir in sorted(p for p in tasks.iterdir() if (p / "adapter_config.json").is_file()):
        files = {
            "adapter_config": ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes()),
            "adapter_model": ("adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes()),
        }
        httpx.put(f"{url}/v1/tasks/{adapter_dir.name}", files=files, timeout=60).raise_for_status()


def load(url: str, args: argparse.Namespace, num_requests: int) -> dict[str, Any]:
    argv = [
        "--url", url, "--num-requests", str(num_requests), "--input-chars", args.input_chars,
        "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed), "--max-seconds", "1800",
        "--no-stream",
    ]  # fmt: skip
    if args.concurrency:
        argv += ["--concurrency", str(args.concurrency)]
    summary = asyncio.run(serving.run_bench(serving.parse_args(argv)))
    if summary["failed"] or summary["not_sent"]:
        raise RuntimeError(f"requests failed against {url}: {summary['errors']}")
    return summary


def run_side(side: str, args: argparse.Namespace, root: Path, first: bool) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = server_command(side, root / "backbone", root / "tasks", root / "store", port, args.max_batch_size,
                             args.device, args.dtype)  # fmt: skip
    process = start(command, url, root / f"{side}.log")
    try:
        if side == "promptserve" and first:
            register(url, root / "tasks")
        load(url, args, num_requests=args.num_tasks)  # warm-up: every task once
        return load(url, args, num_requests=args.num_requests)
    finally:
        stop(process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http_compare", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--num-tasks", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-chars", default="8:64")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, help="at most this many in flight (default: all at once)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="both servers' largest batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="both servers' device: cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="float32", help="both servers' dtype: float32 | bfloat16 | float16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="promptserve-http-") as scratch:
        root = Path(scratch)
        backbone = write_backbone(args.preset, root / "backbone", seed=args.seed)
        write_tasks(backbone, root / "tasks", args.num_tasks, num_virtual_tokens=16)
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SERVERS}
        for repeat in range(args.repeats):
            for side in SERVERS:
                runs[side].append(run_side(side, args, root, first=repeat == 0))
                rate = runs[side][-1]["output_token_throughput"]
                print(f"  {side} {repeat + 1}/{args.repeats}: {rate:.1f} output tokens/s", file=sys.stderr)
    result = summarize(runs, args)
    print(json.dumps({key: value for key, value in result.items() if key != "runs"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def summarize(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    rates = {side: [run["output_token_throughput"] for run in runs[side]] for side in SERVERS}
    medians = {side: statistics.median(values) for side, values in rates.items()}
    return {
        "promptserve_over_peft": medians["promptserve"] / medians["peft"],
        "output_tokens_per_s": medians,
        "pairs": [a / b for a, b in zip(rates["promptserve"], rates["peft"], strict=True)],
        "e2e_latency_p50_ms": {
            side: statistics.median(run["e2e_latency"]["p50_ms"] for run in runs[side]) for side in SERVERS
        },
        "definition": (
            f"{args.num_requests} requests over {args.num_tasks} tasks (half prompt tuning, half prefix tuning), "
            f"{args.input_chars} input characters, {args.max_new_tokens} new tokens, "
            f"{'all at once' if not args.concurrency else f'concurrency {args.concurrency}'}; '{args.preset}' "
            f"preset backbone, 1 torch thread per server, max batch {args.max_batch_size}; promptserve bench drove "
            "both; medians of alternating runs"
        ),
        "runs": runs,
    }


if __name__ == "__main__":
    raise SystemExit(main())
