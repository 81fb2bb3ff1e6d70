"""`make gpu-wheels` and the first half of `make gpu-check`: what the GPU check needs besides torch, for a GPU host
whose Python already has a CUDA build of torch (and maybe no network: a lent machine, an air-gapped one).

- `download DIR`, where the package index is reachable: the wheels of the check's requirements (pyproject's
  dependencies, the train extra, pytest) and of everything they need, at the lock's versions (transformers at
  `--transformers`, where PEFT's generate, the benchmarks' baseline, is right), for the GPU host's Python
  (`--python-version`), into DIR. Torch and what only torch needs are left out: the host's own are used.
- `install TARGET --wheels DIR`, on the GPU host: the requirements this Python does not satisfy, and what they need
  that it does not satisfy either, installed from DIR into TARGET with no index (run the check with TARGET on
  PYTHONPATH); where DIR is absent, it is downloaded first (the index must be reachable then).
Only the standard library and packaging (pip's own copy where packaging is absent) are imported: it runs before the
requirements are there.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pragma: no cover - a bare Python with pip only
    from pip._vendor.packaging.markers import default_environment  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
TRANSFORMERS = "5.23.0"  # the Makefile's BENCH_TRANSFORMERS: PEFT 0.21.2's generate is right on it, wrong from 5.24
CHECK_EXTRAS = ("pytest>=8", "pytest-timeout>=2.3", "transformers<5.24")  # the tests; the PEFT baseline
HOST_OWN = frozenset({"torch", "triton", "sympy", "mpmath", "networkx", "setuptools"})  # torch's: the host's
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in (17, 24, 27, 28, 31, 34, 35)] + ["manylinux2014_x86_64"]


def requirements() -> list[Requirement]:
    """What the check imports: the project's runtime dependencies, the train extra (PEFT), pytest."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["train"], *CHECK_EXTRAS]
    return [Requirement(line) for line in wanted]


def lock_pins(transformers: str) -> dict[str, str]:
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    pins = {}
    for line in lines:
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[canonicalize_name(name)] = pinned.split(";")[0].strip()
    return {**pins, "transformers": transformers}


def is_host_own(name: str) -> bool:
    return name in HOST_OWN or name.startswith("nvidia-")


def wheel_requirements(wheel: Path, environment: dict[str, str]) -> list[Requirement]:
    """The wheel's Requires-Dist that apply in `environment` (no extra)."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode()
    found = [
        Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")
    ]
    return [req for req in found if req.marker is None or req.marker.evaluate({**environment, "extra": ""})]


def wheels_in(folder: Path) -> dict[str, tuple[str, Path]]:
    """name -> (version, wheel file) of the wheels in `folder`."""
    found = {}
    for wheel in folder.glob("*.whl"):
        name, wheel_version = wheel.name.split("-")[:2]
        found[canonicalize_name(name)] = (wheel_version, wheel)
    return found


def download(folder: Path, python_version: str, transformers: str) -> None:
    """The requirements' wheels and their dependencies', layer by layer, at the lock's versions."""
    pins = lock_pins(transformers)
    environment = {**default_environment(), "python_version": python_version,
                   "python_full_version": f"{python_version}.0", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64"}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {canonicalize_name(req.name) for req in requirements()}
    done: set[str] = set()
    while wanted - done:
        layer = sorted(name for name in wanted - done if not is_host_own(name))
        done |= wanted
        if not layer:
            break
        missing = [name for name in layer if name not in pins]
        if missing:
            raise SystemExit(f"gpu-wheels: expected every requirement in requirements.lock; found no pin for {missing}")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest",
             str(folder), "--python-version", python_version, "--implementation", "cp",
             *(f"--platform={platform}" for platform in PLATFORMS), *(f"{name}=={pins[name]}" for name in layer)],
            check=True,
        )  # fmt: skip
        have = wheels_in(folder)
        for name in layer:
            wanted |= {canonicalize_name(req.name) for req in wheel_requirements(have[name][1], environment)}
    size = sum(wheel.stat().st_size for wheel in folder.glob("*.whl"))
    print(f"gpu-wheels: {len(list(folder.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {folder}")


def unsatisfied(req: Requirement) -> str | None:
    """Why this Python does not satisfy `req` (None: it does)."""
    try:
        found = version(req.name)
    except PackageNotFoundError:
        return "absent"
    return None if req.specifier.contains(found, prereleases=True) else f"found {found}"


def install_plan(roots: Iterable[Requirement], wheels: dict[str, tuple[str, Path]]) -> dict[str, Path]:
    """name -> wheel of every requirement this Python does not satisfy and of what those need that it does not."""
    plan: dict[str, Path] = {}
    pending = list(roots)
    while pending:
        req = pending.pop()
        name = canonicalize_name(req.name)
        if name in plan:
            if not req.specifier.contains(wheels[name][0], prereleases=True):
                raise SystemExit(f"gpu-check: expected {req}; the wheels have {name} {wheels[name][0]}")
            continue
        why = unsatisfied(req)
        if why is None:
            continue
        if is_host_own(name):
            raise SystemExit(f"gpu-check: expected this Python ({sys.executable}) to have {req}; {why}")
        if name not in wheels or not req.specifier.contains(wheels[name][0], prereleases=True):
            raise SystemExit(f"gpu-check: expected {req} ({why} here) among the wheels; run `make gpu-wheels` where "
                             "the package index is reachable and bring its folder")  # fmt: skip
        plan[name] = wheels[name][1]
        pending += wheel_requirements(wheels[name][1], default_environment())
    return plan


def install(target: Path, folder: Path, transformers: str) -> None:
    """What this Python lacks, from the wheels in `folder` (downloaded first for this Python if it is not there)."""
    if not folder.is_dir():
        download(folder, f"{sys.version_info.major}.{sys.version_info.minor}", transformers)
    plan = install_plan(requirements(), wheels_in(folder))
    if not plan:
        print("gpu-check: this Python has every requirement")
        return
    print(f"gpu-check: installing into {target}: {', '.join(sorted(plan))}")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                    str(target), *map(str, plan.values())], check=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_env", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="the wheels, where the package index is reachable")
    fetch.add_argument("folder", type=Path)
    fetch.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    put = commands.add_parser("install", help="what this Python lacks, into a folder for PYTHONPATH")
    put.add_argument("target", type=Path)
    put.add_argument("--wheels", type=Path, required=True, help="a `download` folder (made first if absent)")
    for command in (fetch, put):
        command.add_argument("--transformers", default=TRANSFORMERS, help="the transformers version to bring")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"\d+\.\d+\.\d+", args.transformers):
        parser.error(f"--transformers: expected a version such as {TRANSFORMERS}; found {args.transformers!r}")
    if args.command == "download":
        download(args.folder, args.python_version, args.transformers)
    else:
        install(args.target, args.wheels, args.transformers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
