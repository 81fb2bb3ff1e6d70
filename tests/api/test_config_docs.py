"""The README's Configuration table is the settings' own: every setting, its flag, default and help, in order."""

from __future__ import annotations

from pathlib import Path

from server.api.settings import setting_specs
from server.cli import serve_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def configuration_table() -> list[str]:
    text = README.read_text()
    start = text.index("\n## Configuration\n")
    section = text[start : text.index("\n## ", start + 1)]
    return [line for line in section.splitlines() if line.startswith("| `")]


def test_the_configuration_table_is_the_settings_own() -> None:
    expected = [spec.table_row() for spec in setting_specs()]
    assert configuration_table() == expected, "README's table; regenerate it from setting_specs():\n" + "\n".join(
        expected
    )


def test_every_setting_is_a_serve_flag_defaulting_to_its_variable() -> None:
    flags = {
        option: action for action in serve_parser()._actions for option in action.option_strings if option != "--help"
    }
    for spec in setting_specs():
        action = flags[spec.flag]
        assert action.dest == spec.name and action.default is None  # unset: the variable, then the default
        assert spec.variable in (action.help or "") and f"default: {spec.shown_default}" in (action.help or "")
