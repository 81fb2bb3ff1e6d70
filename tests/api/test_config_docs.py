"""The README's Configuration table names every setting and every `promptserve serve` flag, and only real ones."""

from __future__ import annotations

import re
from pathlib import Path

from server.api.settings import Settings
from server.cli import serve_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def configuration_rows() -> list[tuple[list[str], list[str]]]:
    """(setting names, flags) of each row of the table under `## Configuration`."""
    text = README.read_text()
    start = text.index("\n## Configuration\n")
    section = text[start : text.index("\n## ", start + 1)]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        rows.append((re.findall(r"`([A-Z_]+)`", cells[0]), re.findall(r"`(--[a-z-]+)`", cells[1])))
    return rows


def test_every_setting_is_documented_and_every_documented_one_exists() -> None:
    documented = {name.lower() for names, _ in configuration_rows() for name in names}
    assert documented == set(Settings.model_fields)


def test_every_serve_flag_is_documented_on_its_setting() -> None:
    documented = {flag: names for names, flags in configuration_rows() for flag in flags}
    flags = {
        option: action.dest
        for action in serve_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    assert set(documented) == set(flags)
    for flag, dest in flags.items():
        assert dest.upper() in documented[flag], f"{flag} sets {dest}, the README puts it on {documented[flag]}"
