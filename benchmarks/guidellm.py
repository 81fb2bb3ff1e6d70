"""guidellm against promptserve's demo, as a user runs it: a fixed-length synthetic run on /v1/completions.

`make bench-guidellm` (or `python -m benchmarks.guidellm` once `.venv-guidellm` exists). guidellm 0.8.1 pins
click~=8.4, which the lock's click does not satisfy, so it lives in a venv of its own (`.venv-guidellm`, CPU torch
installed first); this script runs in the project's venv, starts `promptserve serve` on a free port and drives it
with that venv's `guidellm` CLI. guidellm's fixed-length runs send `ignore_eos: true`: every request must come
back with exactly the asked number of tokens, which this script checks from guidellm's own JSON (kept under
benchmarks/results/). The synthetic prompts are made with the demo backbone's own tokenizer (no Hub).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.http_compare import free_port, start, stop
from server.demo import DEMO_BACKBONE_DIR

GUIDELLM = Path(".venv-guidellm/bin/guidellm")
RESULTS = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.guidellm", description=__doc__.splitlines()[0])
    parser.add_argument("--guidellm", type=Path, default=GUIDELLM, help="the guidellm CLI (default: %(default)s)")
    parser.add_argument("--model", default="upper", help="the task (or the backbone) to benchmark")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--streams", type=int, default=8, help="concurrent requests")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=24)
    parser.add_argument("--json", type=Path, default=RESULTS / "guidellm-cpu.json", help="guidellm's JSON report")
    return parser.parse_args(argv)


def guidellm_command(args: argparse.Namespace, url: str) -> list[str]:
    data = f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}"
    return [
        str(args.guidellm), "run",
        "--backend", f"kind=openai_http,target={url},model={args.model},request_format=/v1/completions",
        "--tokenizer", f"kind=hf_auto,model={DEMO_BACKBONE_DIR}",
        "--data", data,
        "--profile", f"kind=concurrent,streams={args.streams}",
        "--constraint", f"kind=max_requests,count={args.requests}",
        "--output", f"kind=json,path={args.json.resolve()}",
        "--disable-console-interactive",
    ]  # fmt: skip


def output_counts(report: dict[str, Any]) -> list[int]:
    """Each successful request's output token count, as guidellm measured it."""
    counts = []
    for benchmark in report["benchmarks"]:
        for request in benchmark["requests"]["successful"]:
            counts.append(int(request["output_metrics"]["text_tokens"]))
    return counts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.guidellm.exists():
        sys.stderr.write(f"no {args.guidellm}: run `make bench-guidellm` (it builds .venv-guidellm)\n")
        return 2
    args.json.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as store:
        log = Path(store) / "server.log"
        serve = [sys.executable, "-m", "server.cli", "serve", "--store", store, "--port", str(port)]
        server = start(serve, url, log)
        try:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
            subprocess.run(guidellm_command(args, url), env=env, check=True)
        finally:
            stop(server)
    counts = output_counts(json.loads(args.json.read_text()))
    exact = sum(count == args.output_tokens for count in counts)
    sys.stdout.write(f"{exact} of {len(counts)} requests returned exactly {args.output_tokens} tokens\n")
    return 0 if counts and exact == len(counts) else 1


if __name__ == "__main__":
    sys.exit(main())
