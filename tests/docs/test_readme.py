"""The README is the front door: short, its two set-up commands real Makefile targets, and CI runs its test command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_README_LINES = 300


def quick_start_commands() -> list[list[str]]:
    """The commands of the first shell block under `## Quick start`, comments left out."""
    text = README.read_text()
    section = text[text.index("\n## Quick start\n") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "expected a bash block under ## Quick start; found none"
    return [words for line in block.group(1).splitlines() if (words := shlex.split(line, comments=True))]


def test_the_readme_stays_a_front_door() -> None:
    num_lines = len(README.read_text().splitlines())
    assert num_lines < MAX_README_LINES, f"expected a README under {MAX_README_LINES} lines; found {num_lines}"


def test_the_quick_start_is_the_serve_and_test_targets() -> None:
    commands = quick_start_commands()
    assert commands == [["make", "serve"], ["make", "test"]]
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    assert {"serve", "test"} <= targets


def test_ci_runs_the_readmes_test_command() -> None:
    test_command = quick_start_commands()[-1]
    ci = [shlex.split(line) for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.startswith("#")]
    assert test_command in ci, f"expected .ci/run to run {shlex.join(test_command)}; found {ci}"
