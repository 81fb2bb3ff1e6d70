"""`python -m benchmarks.gpu_check` (`make gpu-check`): everything the first GPU should prove, in one command.

Stages, each in its own process with its own time limit, so one that fails or hangs costs only itself:
1. tests: the GPU-marked tests (`pytest -m gpu`), tokens and log-probabilities against the uncached reference;
2. self-check: the start-up self-check on the built-in backbone in bfloat16 and in float32;
3. bench: `python -m benchmarks --quick` (engine over PEFT, over the hand-written mixed batch, mixed over uniform,
   continuous over static);
4. http: `python -m benchmarks.http_compare`, promptserve against PEFT's per-task batches over HTTP;
5. attention: `python -m benchmarks.attention_backends`, one layer's attention over the pool, SDPA against
   FlexAttention compiled (attention_backend=flex; the GPU-marked tests compare their tokens too).
It writes one JSON and a one-screen summary (`gpu-check-<device>.json`, `.txt`) under benchmarks/results/ and exits
non-zero if any stage failed. Without CUDA it says so in one line and exits 2; `--device cpu` is a dry run of the
same stages at tiny sizes (the test suite runs it, so the script cannot rot before a GPU arrives).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from server.engine.reference import peft_generate_broken_reason

RESULTS = Path(__file__).parent / "results"
EXIT_NO_CUDA = 2


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    command: list[str]
    timeout_s: int
    json_out: Path | None = None  # where the stage writes its figures
    needs_peft_generate: bool = False  # its baseline is PEFT's generate, wrong on some transformers releases


@dataclass(frozen=True, slots=True)
class StageResult:
    name: str
    ok: bool
    seconds: float
    detail: str  # the last lines of its output
    figures: dict[str, Any] | None = None
    skipped: str | None = None  # why it did not run (it does not fail the check)


def stages(device: str, scratch: Path) -> list[Stage]:
    """On CUDA the real sizes (about 8 minutes on one H100); on a CPU a dry run of the same commands, tiny."""
    python = sys.executable
    dry = device == "cpu"
    bench_json, http_json, attention_json = scratch / "bench.json", scratch / "http.json", scratch / "attention.json"
    bench = [python, "-m", "benchmarks", "--quick", "--device", device, "--json", str(bench_json)]
    if dry:
        bench += ["--only", "mixed,hand", "--preset", "cpu-small", "--repeats", "1", "--new-tokens", "2"]
    else:
        bench += ["--only", "mixed,peft,hand,static"]
    http = [python, "-m", "benchmarks.http_compare", "--device", device, "--json", str(http_json)]
    if dry:
        http += ["--preset", "cpu-small", "--num-tasks", "2", "--num-requests", "2", "--max-new-tokens", "2",
                 "--repeats", "1"]  # fmt: skip
    attention = [python, "-m", "benchmarks.attention_backends", "--device", device, "--json", str(attention_json)]
    if dry:
        attention += ["--size", "tiny", "--compile", "none", "--repeats", "1", "--layers", "1"]
    tests = [python, "-m", "pytest", "-q", "-m", "gpu", "tests/engine", "-p", "no:cacheprovider"]
    self_check = [python, "-m", "benchmarks.gpu_check", "--self-check-only", "--device", device]
    slack = 5 if dry else 1  # a CPU runs even the tiny sizes slower than a GPU runs the real ones
    return [
        Stage("tests", tests, 150 * slack),
        Stage("self-check", self_check, 90 * slack),
        Stage("bench", bench, 240 * slack, bench_json, needs_peft_generate=not dry),
        Stage("http", http, 180 * slack, http_json, needs_peft_generate=True),
        Stage("attention", attention, 240 * slack, attention_json),
    ]


def run_stage(stage: Stage) -> StageResult:
    broken = peft_generate_broken_reason() if stage.needs_peft_generate else None
    if broken is not None:  # make gpu-check and the image install transformers 5.23.0, where it is right
        return StageResult(stage.name, True, 0.0, "", skipped=f"{broken}; run it where transformers is 5.23.0")
    started = time.monotonic()
    try:
        done = subprocess.run(stage.command, capture_output=True, text=True, timeout=stage.timeout_s, check=False)
        ok, output = done.returncode == 0, done.stdout + done.stderr
        detail = output if ok else f"exit {done.returncode}\n{output}"
    except subprocess.TimeoutExpired as timeout:
        ok, detail = False, f"timed out after {stage.timeout_s} s\n{timeout.stdout or ''}"
    figures = None
    if ok and stage.json_out is not None and stage.json_out.is_file():
        figures = json.loads(stage.json_out.read_text())
    tail = "\n".join(str(detail).strip().splitlines()[-6:])
    return StageResult(stage.name, ok, time.monotonic() - started, tail, figures)


def check_self(device: str) -> None:
    """The start-up self-check on the built-in backbone, in bfloat16 and in float32 (raises if one fails)."""
    from server.engine.backbone import load_backbone
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.selfcheck import self_check

    for dtype in ("bfloat16", "float32"):
        config = EngineConfig(device=device, dtype=dtype, kv_cache_bytes=64 * 1024 * 1024)
        seconds = self_check(Engine(load_backbone(None, device, dtype), config))
        print(f"self-check passed in {dtype} on {device}: {seconds:.2f} s")


def device_line(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} (dry run), torch {torch.__version__}"


def summary(device: str, results: list[StageResult]) -> str:
    lines = [f"gpu-check on {device_line(device)}"]
    for result in results:
        status = "skipped" if result.skipped else "ok" if result.ok else "FAILED"
        lines.append(f"  {result.name:11} {status:7} {result.seconds:6.1f} s {result.skipped or ''}".rstrip())
        lines += [f"      {line}" for line in figure_lines(result)]
        if not result.ok:
            lines += [f"      {line}" for line in result.detail.splitlines()]
    return "\n".join(lines) + "\n"


def figure_lines(result: StageResult) -> list[str]:
    """The ratios a stage measured (its JSON's figures), one line each."""
    if not result.figures:
        return []
    if result.name == "http":
        return [f"promptserve_over_peft {result.figures['promptserve_over_peft']:.3f}"]
    if result.name == "attention":
        return attention_lines(result.figures["timings"])
    return [f"{name} {detail['ratio']:.3f}" for name, detail in result.figures.get("details", {}).items()]


def attention_lines(timings: list[dict[str, Any]]) -> list[str]:
    """Per FlexAttention variant: its time over SDPA's for each shape, and its first calls (compiles) together."""
    lines = []
    for backend in dict.fromkeys(t["backend"] for t in timings if t["backend"] != "sdpa"):
        mine = [t for t in timings if t["backend"] == backend]
        ratios = " ".join(f"{t['ratio_to_sdpa']:.2f}" for t in mine)
        lines.append(f"{backend} / sdpa: {ratios}; first calls {sum(t['first_call_s'] for t in mine):.0f} s")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N; cpu: a dry run at tiny sizes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and the summary go")
    parser.add_argument("--self-check-only", action="store_true", help=argparse.SUPPRESS)  # stage 2's process
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu-check: expected a CUDA device; this torch ({torch.__version__}, CUDA {torch.version.cuda}) sees "
              "none: run it on a GPU host with a CUDA build of torch (docs/docker.md)", file=sys.stderr)  # fmt: skip
        return EXIT_NO_CUDA
    if args.self_check_only:
        check_self(args.device)
        return 0
    with tempfile.TemporaryDirectory(prefix="promptserve-gpu-check-") as scratch:
        results = []
        for stage in stages(args.device, Path(scratch)):
            results.append(run_stage(stage))
            print(f"gpu-check: {stage.name} {'ok' if results[-1].ok else 'FAILED'}", file=sys.stderr, flush=True)
    name = f"gpu-check-{args.device.replace(':', '')}"
    args.out.mkdir(parents=True, exist_ok=True)
    document = {"device": device_line(args.device), "stages": [asdict(result) for result in results]}
    (args.out / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
    text = summary(args.device, results)
    (args.out / f"{name}.txt").write_text(text)
    print(text, end="")
    return 0 if all(result.ok for result in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
