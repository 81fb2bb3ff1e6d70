"""`make gpu-check` on a GPU host whose Python has CUDA torch but not the rest, with no network: what it installs
from the wheels `make gpu-wheels` brought (benchmarks/gpu_env.py)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from benchmarks import gpu_env


def fake_wheel(folder: Path, name: str, version: str, *requires: str) -> Path:
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    metadata = "\n".join([f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {req}" for req in requires)])
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", metadata + "\n")
    return wheel


def test_it_installs_what_this_python_lacks_and_what_that_needs_but_nothing_it_has(tmp_path: Path):
    needs = fake_wheel(tmp_path, "promptserve_absent_a", "1.0", "promptserve-absent-b>=2", "packaging",
                       "promptserve-absent-c; extra == 'docs'", "torch>=2.5")  # fmt: skip
    needed = fake_wheel(tmp_path, "promptserve_absent_b", "2.1")
    fake_wheel(tmp_path, "packaging", "0.1")  # older than this Python's: never installed in its place
    plan = gpu_env.install_plan([Requirement("promptserve-absent-a"), Requirement("packaging>=20")],
                                gpu_env.wheels_in(tmp_path))  # fmt: skip
    assert plan == {"promptserve-absent-a": needs, "promptserve-absent-b": needed}  # torch: this Python's own


def test_a_requirement_neither_here_nor_among_the_wheels_is_named(tmp_path: Path):
    fake_wheel(tmp_path, "promptserve_absent_a", "1.0")
    with pytest.raises(SystemExit, match=r"expected promptserve-absent-a>=2 \(absent here\) among the wheels"):
        gpu_env.install_plan([Requirement("promptserve-absent-a>=2")], gpu_env.wheels_in(tmp_path))


def test_torch_is_never_brought_with_the_wheels(tmp_path: Path):
    with pytest.raises(SystemExit, match=r"expected this Python .* to have torch>=99; found"):
        gpu_env.install_plan([Requirement("torch>=99")], gpu_env.wheels_in(tmp_path))


def test_every_requirement_of_the_check_has_a_pin_in_the_lock():
    pins = gpu_env.lock_pins(gpu_env.TRANSFORMERS)
    names = {req.name.lower().replace("_", "-") for req in gpu_env.requirements()}
    assert names <= set(pins), names - set(pins)
    assert pins["transformers"] == gpu_env.TRANSFORMERS
