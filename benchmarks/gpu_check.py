"""`python -m benchmarks.gpu_check` (`make gpu-check`): everything the first GPU should prove, in one command.

Stages, each in its own process with its own time limit, so one that fails or hangs costs only itself:
1. tests: the GPU-marked tests (`pytest -m gpu`), tokens and log-probabilities against the uncached reference;
2. self-check: the start-up self-check on the built-in backbone in bfloat16 and in float32;
3. bench: `python -m benchmarks --quick` (engine over PEFT, over the hand-written mixed batch, mixed over uniform,
   continuous over static);
4. http: `python -m benchmarks.http_compare`, promptserve against PEFT's per-task batches over HTTP;
5. attention: `python -m benchmarks.attention_backends`, one layer's attention over the pool, SDPA against
   FlexAttention compiled (attention_backend=flex; the GPU-marked tests compare their tokens too);
6. sampler: `python -m benchmarks.sampler`, the sampler's time for 256 rows over vocabularies of 259, 32,000 and
   128,256 tokens.
The whole check keeps within `--budget-s` (8 minutes on CUDA). It writes one JSON and a one-screen summary
(`gpu-check-<device>.json`, `.txt`) and each stage's whole output (`gpu-check-<device>-<stage>.log`) under
benchmarks/results/, the JSON and the summary again after every stage, so a check cut short keeps what it measured;
it exits non-zero if any stage failed. Without CUDA it says so in one line and exits 2; `--device cpu` is a dry run
of the same stages at tiny sizes (the test suite runs it, so the script cannot rot before a GPU arrives).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from packaging.requirements import Requirement

from server.engine.reference import peft_generate_broken_reason

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
EXIT_NO_CUDA = 2
BUDGET_S = {"cuda": 480, "cpu": 1500}  # the whole check: 8 minutes on a GPU; the CPU dry run is slower
MIN_STAGE_S = 30  # kept for each later stage while a stage runs: one that hangs cannot take the others' time
DETAIL_LINES = 8  # of a stage's output, in the JSON (the whole of it is in its log)
GPU_TEST_FILES = ("tests/engine/test_gpu.py", "tests/prompt_store/test_peft_roundtrip.py")
PYTEST_CLOSING = re.compile(r"\d+ (passed|failed|skipped|errors?|deselected)\b.* in [\d.]+s")


@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    command: list[str]
    timeout_s: int
    json_out: Path | None = None  # where the stage writes its figures
    needs_peft_generate: bool = False  # its baseline is PEFT's generate, wrong on some transformers releases
    fails_on_skips: bool = False  # a test it skips is a promise it did not check (the GPU tests, on a GPU)


@dataclass(frozen=True, slots=True)
class StageResult:
    name: str
    ok: bool
    seconds: float
    detail: str  # the last lines of its output
    figures: dict[str, Any] | None = None
    skipped: str | None = None  # why it did not run (it does not fail the check)
    outcome: str = ""  # the line that says how it went (pytest's closing line, the self-check's results)


def stages(device: str, scratch: Path) -> list[Stage]:
    """On CUDA the real sizes (about 8 minutes on one H100); on a CPU a dry run of the same commands, tiny."""
    python = sys.executable
    dry = device == "cpu"
    bench_json, http_json, attention_json = scratch / "bench.json", scratch / "http.json", scratch / "attention.json"
    sampler_json = scratch / "sampler.json"
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
    sampler = [python, "-m", "benchmarks.sampler", "--device", device, "--json", str(sampler_json)]
    if dry:
        sampler += ["--rows", "8", "--vocab", "300", "2000", "--repeats", "1"]
    # the GPU-marked tests' files alone: collecting every test would import what only the CPU suite needs
    tests = [python, "-m", "pytest", "-q", "-rs", "-m", "gpu", *GPU_TEST_FILES, "-p", "no:cacheprovider"]
    self_check = [python, "-m", "benchmarks.gpu_check", "--self-check-only", "--device", device]
    slack = 5 if dry else 1  # a CPU runs even the tiny sizes slower than a GPU runs the real ones
    return [
        Stage("tests", tests, 150 * slack, fails_on_skips=not dry),
        Stage("self-check", self_check, 90 * slack),
        Stage("bench", bench, 240 * slack, bench_json, needs_peft_generate=not dry),
        Stage("http", http, 180 * slack, http_json, needs_peft_generate=True),
        Stage("attention", attention, 240 * slack, attention_json),
        Stage("sampler", sampler, 60 * slack, sampler_json),
    ]


def run_stage(stage: Stage, limit_s: float, log: Path) -> StageResult:
    """The stage's command in a process group of its own, its output in `log` as it runs; past `limit_s` the whole
    group is killed (a compiler's worker processes too, which would hold a pipe open)."""
    broken = peft_generate_broken_reason() if stage.needs_peft_generate else None
    if broken is not None:  # make gpu-check and the image install transformers 5.23.0, where it is right
        return StageResult(stage.name, True, 0.0, "", skipped=f"{broken}; run it where transformers is 5.23.0")
    started = time.monotonic()
    with log.open("w") as output:
        process = subprocess.Popen(stage.command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    seconds = time.monotonic() - started
    lines = log.read_text(errors="replace").strip().splitlines()
    ok = code == 0
    if code is None:
        lines.append(f"timed out after {limit_s:.0f} s (killed)")
    elif not ok:
        lines.append(f"exit {code}")
    closing = outcome(lines)
    if ok and stage.fails_on_skips and re.search(r"\d+ skipped", closing):
        ok = False
        lines.append("expected every GPU test to run here; some were skipped (their reasons: the log, -rs)")
    figures = None
    if stage.json_out is not None and stage.json_out.is_file():  # what it measured, even if it failed after
        figures = json.loads(stage.json_out.read_text())
    return StageResult(stage.name, ok, seconds, "\n".join(lines[-DETAIL_LINES:]), figures, outcome=closing)


def outcome(lines: list[str]) -> str:
    """The line that says how a stage went, where it prints one: pytest's closing line, the self-check's results."""
    closing = [line for line in lines if PYTEST_CLOSING.search(line)]
    if closing:
        return closing[-1].strip("= ")
    return "; ".join(line for line in lines if line.startswith("self-check passed"))


def run_check(device: str, out: Path, stages: list[Stage], budget_s: float) -> list[StageResult]:
    """Every stage within the check's `budget_s`, its result written (JSON and summary) as soon as it is known, so a
    check cut short still leaves what it measured. A stage may run to its own limit but no further than leaves
    `MIN_STAGE_S` to each stage after it; one left with less than half that is recorded as not run."""
    deadline = time.monotonic() + budget_s
    name = f"gpu-check-{device.replace(':', '')}"
    out.mkdir(parents=True, exist_ok=True)
    environment = describe_environment(device)
    results: list[StageResult] = []
    write_results(out / name, device, environment, budget_s, results, [stage.name for stage in stages])
    for i, stage in enumerate(stages):
        left = deadline - time.monotonic() - MIN_STAGE_S * (len(stages) - i - 1)
        if left < MIN_STAGE_S / 2:  # what was kept for it, less what the stages before overran by
            result = StageResult(stage.name, False, 0.0, f"not run: the check's {budget_s:.0f} s budget was spent")
        else:
            result = run_stage(stage, min(stage.timeout_s, left), out / f"{name}-{stage.name}.log")
        results.append(result)
        print(f"gpu-check: {stage.name} {status_of(result)}", file=sys.stderr, flush=True)
        write_results(out / name, device, environment, budget_s, results, [s.name for s in stages[i + 1 :]])
    return results


def write_results(
    path: Path, device: str, environment: dict[str, Any], budget_s: float, results: list[StageResult],
    pending: list[str],
) -> None:  # fmt: skip
    """`path`.json and `path`.txt, replaced whole (written beside, then renamed) after each stage."""
    stages = [asdict(result) for result in results]
    document = {"device": device_line(device), "environment": environment, "budget_s": budget_s,
                "complete": not pending, "pending": pending, "stages": stages}  # fmt: skip
    text = summary(device, results, pending, environment)
    for suffix, content in ((".json", json.dumps(document, indent=2) + "\n"), (".txt", text)):
        partial = path.with_name(path.name + suffix + ".partial")
        partial.write_text(content)
        partial.replace(path.with_name(path.name + suffix))


def describe_environment(device: str) -> dict[str, Any]:
    """What the numbers ran on, and what the first GPU user needs to know at once: the versions, whether a C
    compiler is there (Triton builds its launcher with one: torch.compile, attention_backend=flex) and which of the
    project's requirements this interpreter lacks."""
    versions = {name: installed_version(name) for name in ("torch", "transformers", "peft", "triton")}
    environment: dict[str, Any] = {"python": platform.python_version(), "versions": versions,
                                   "cuda": torch.version.cuda, "c_compiler": c_compiler(),
                                   "missing": missing_requirements(), "torch_lacks": torch_lacks()}  # fmt: skip
    if device.startswith("cuda"):
        environment["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return environment


def torch_lacks() -> list[str]:
    """The newer torch functions the engine uses where this torch has them (pyproject allows torch from 2.5; the
    lock and the suite are 2.13's): without `grouped_mm` LoRA rows take a matmul pair per task, without
    `compute_q_blocks` FlexAttention builds the backward pass's index too; what the numbers ran on."""
    from torch.nn.attention.flex_attention import BlockMask

    lacks = [] if hasattr(torch.nn.functional, "grouped_mm") else ["torch.nn.functional.grouped_mm"]
    if "compute_q_blocks" not in inspect.signature(BlockMask.from_kv_blocks).parameters:
        lacks.append("BlockMask.from_kv_blocks(compute_q_blocks=...)")
    return lacks


def installed_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def c_compiler() -> str | None:
    compiler = os.environ.get("CC")
    return compiler or shutil.which("gcc") or shutil.which("clang") or shutil.which("cc")


def missing_requirements() -> list[str]:
    """The project's requirements (pyproject's dependencies, the train extra and pytest) this interpreter does not
    satisfy, as `name>=x (found y)` or `name (absent)`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["train"], "pytest>=8", "pytest-timeout"]
    missing = []
    for requirement in map(Requirement, wanted):
        found = installed_version(requirement.name)
        if found is None:
            missing.append(f"{requirement.name} (absent)")
        elif not requirement.specifier.contains(found, prereleases=True):
            missing.append(f"{requirement} (found {found})")
    return missing


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


def summary(
    device: str, results: list[StageResult], pending: list[str] | None = None, environment: dict[str, Any] | None = None
) -> str:
    lines = [f"gpu-check on {device_line(device)}"]
    if environment is not None:
        lines += environment_lines(environment)
    for result in results:
        line = f"  {result.name:11} {status_of(result):7} {result.seconds:6.1f} s {result.skipped or ''}"
        lines.append(line.rstrip())
        if result.outcome and not result.skipped:
            lines.append(f"      {result.outcome}")
        lines += [f"      {line}" for line in figure_lines(result)]
        if not result.ok:
            lines += [f"      {line}" for line in result.detail.splitlines()[-4:] if line != result.outcome]
    lines += [f"  {name:11} not run yet" for name in pending or []]
    return "\n".join(lines) + "\n"


def environment_lines(environment: dict[str, Any]) -> list[str]:
    versions = ", ".join(f"{name} {found or '(absent)'}" for name, found in environment["versions"].items())
    compiler = environment["c_compiler"] or "none (Triton, so torch.compile and attention_backend=flex, need one)"
    lines = [f"  {versions}; C compiler: {compiler}"]
    if environment["missing"]:
        lines.append(f"  not installed as pyproject asks: {', '.join(environment['missing'])}")
    if environment["torch_lacks"]:
        lines.append(f"  this torch lacks (the engine does without): {', '.join(environment['torch_lacks'])}")
    return lines


def status_of(result: StageResult) -> str:
    return "skipped" if result.skipped else "ok" if result.ok else "FAILED"


def figure_lines(result: StageResult) -> list[str]:
    """The ratios a stage measured (its JSON's figures), one line each."""
    if not result.figures:
        return []
    if result.name == "http":
        return [f"promptserve_over_peft {result.figures['promptserve_over_peft']:.3f}"]
    if result.name == "attention":
        return attention_lines(result.figures["timings"])
    if result.name == "sampler":
        return sampler_lines(result.figures["results"])
    return [f"{name} {detail['ratio']:.3f}" for name, detail in result.figures.get("details", {}).items()]


def attention_lines(timings: list[dict[str, Any]]) -> list[str]:
    """Per FlexAttention variant: its time over SDPA's for each shape, and its first calls (compiles) together."""
    lines = []
    for backend in dict.fromkeys(t["backend"] for t in timings if t["backend"] != "sdpa"):
        mine = [t for t in timings if t["backend"] == backend]
        ratios = " ".join(f"{t['ratio_to_sdpa']:.2f}" for t in mine)
        lines.append(f"{backend} / sdpa: {ratios}; first calls {sum(t['first_call_s'] for t in mine):.0f} s")
    return lines


def sampler_lines(timings: list[dict[str, Any]]) -> list[str]:
    """Per vocabulary: the sampler's milliseconds a step for each kind of row."""
    lines = []
    for vocab in dict.fromkeys(t["vocab"] for t in timings):
        mine = " ".join(f"{t['kind']} {t['ms']:.2f}" for t in timings if t["vocab"] == vocab)
        lines.append(f"choose() ms, {timings[0]['num_rows']} rows of {vocab} tokens: {mine}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N; cpu: a dry run at tiny sizes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and the summary go")
    parser.add_argument("--budget-s", type=float, help="the whole check's limit (default: 480 s on CUDA)")
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
    budget_s = args.budget_s or BUDGET_S["cpu" if args.device == "cpu" else "cuda"]
    with tempfile.TemporaryDirectory(prefix="promptserve-gpu-check-") as scratch:
        results = run_check(args.device, args.out, stages(args.device, Path(scratch)), budget_s)
    print((args.out / f"gpu-check-{args.device.replace(':', '')}.txt").read_text(), end="")
    return 0 if all(result.ok for result in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
