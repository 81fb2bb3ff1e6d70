"""docs/architecture.md names real code: every class, method, module function, file and setting it names exists, in
its prose, its tables and its diagram (so a rename that leaves the page behind fails here)."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import transformers

from server.api.settings import setting_names

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "architecture.md"
PACKAGES = ("server.engine", "server.api", "prompt_store")
CLASS_OR_MEMBER = re.compile(r"^([A-Z][A-Za-z]+)(?:\.([a-z_]\w*))?$")  # `TaskCache`, `TaskStore.register`
MODULE_MEMBER = re.compile(r"^([a-z_]+)\.([a-z_]\w*)$")  # `intake.build_request`
SETTING = re.compile(r"^([A-Z][A-Z_]+)(?:=\w+)?$")  # `MAX_BATCH_TOKENS`, `CACHE_PROMPT_KV=false`
SOURCE_FILE = re.compile(r"^(?:server|prompt_store|tests|benchmarks)/[\w/]+\.py$")
# In the diagram: `Class.member`, a CamelCase class (two capitals or more), `module.function`, a SETTING.
DIAGRAM_NAME = re.compile(
    r"\b[A-Z]\w*\.[a-z_]\w*|\b[A-Z][A-Za-z]*[A-Z][a-z]\w*|\b[a-z_]+\.[a-z_]\w*|\b[A-Z]+_[A-Z_]+\b"
)
NOT_CODE = {"OpenAI"}  # a company, in the diagram's prose


def modules() -> dict[str, list[ModuleType]]:
    """Every module and package of the packages, by its last name (server.api.errors and server.engine.errors
    are both `errors`)."""
    found: dict[str, list[ModuleType]] = {}
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, f"{package_name}."):
            found.setdefault(info.name.rsplit(".", 1)[1], []).append(importlib.import_module(info.name))
    return found


def named_object(name: str, namespace: dict[str, list[ModuleType]]) -> Any:
    """A class of the packages (or of transformers, whose extension point the page names), or None."""
    for module in (*(m for ms in namespace.values() for m in ms), transformers):
        value = getattr(module, name, None)
        if isinstance(value, type):
            return value
    return None


def code_spans() -> list[str]:
    page = PAGE.read_text()
    diagram = re.search(r"```mermaid\n(.*?)```", page, re.S)
    assert diagram is not None, "expected a mermaid diagram of a request's path; found none"
    names = DIAGRAM_NAME.findall(diagram.group(1))
    return [*re.findall(r"`([^`\n]+)`", page), *(name for name in names if name not in NOT_CODE)]


def unresolved(span: str, namespace: dict[str, list[ModuleType]]) -> str | None:
    """Why the span names nothing that exists; None when it does, or when it is not a name of code."""
    if SOURCE_FILE.match(span):
        return None if (ROOT / span).is_file() else "no such file"
    if match := SETTING.match(span.removeprefix("PROMPTSERVE_")):
        return None if match.group(1).lower() in setting_names() else "no such setting"
    if match := CLASS_OR_MEMBER.match(span):
        owner = named_object(match.group(1), namespace)
        if owner is None:
            return "no such class"
        member = match.group(2)
        fields = getattr(owner, "__dataclass_fields__", {})
        return None if member is None or hasattr(owner, member) or member in fields else "no such member"
    if (match := MODULE_MEMBER.match(span)) and match.group(1) in namespace and match.group(2) != "py":
        found = any(hasattr(module, match.group(2)) for module in namespace[match.group(1)])
        return None if found else "no such function"
    return None


def test_every_name_of_code_on_the_architecture_page_exists() -> None:
    namespace = modules()
    wrong = {span: why for span in code_spans() if (why := unresolved(span, namespace)) is not None}
    assert not wrong, f"docs/architecture.md names what the code does not have: {wrong}"
