"""Which backbone modules a PEFT LoRA or IA3 config targets: PEFT's own rules, on the module names the backbone lists.

The store cannot import PEFT (an optional extra) or the model, so this follows PEFT 0.21's `check_target_module_exists`
on the backbone's module names (tests/prompt_store/test_targets.py checks it against PEFT's choice on the same
models): a module is excluded by `exclude_modules` or `modules_to_save`; a string `target_modules` is a regular
expression the whole name must match; a list names modules exactly or by their last dotted parts, optionally only in
the layers `layers_to_transform` lists (the layer index after `layers_pattern`, else the first numbered segment).
`rank_pattern` / `alpha_pattern` keys and IA3's `feedforward_modules` are matched as PEFT matches them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any


def is_excluded(config: dict[str, Any], name: str) -> bool:
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return True
    if isinstance(exclude, list) and (name in exclude or any(name.endswith(f".{key}") for key in exclude)):
        return True
    # PEFT never puts an adapter on a module it saves whole (the classification head)
    return any(re.match(rf"(^|.*\.){key}($|\..*)", name) for key in config.get("modules_to_save") or [])


def layer_index(config: dict[str, Any], name: str) -> int | None:
    """The layer a module sits in, as PEFT reads it from its name (None: not in a numbered layer)."""
    patterns = config.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def is_target(config: dict[str, Any], name: str) -> bool:
    """Whether PEFT puts an adapter on the module `name` (named as in the model PEFT wraps)."""
    if is_excluded(config, name):
        return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if not isinstance(targets, list):
        return False
    if name in targets:
        return True
    if not any(name.endswith(f".{key}") for key in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = layer_index(config, name)
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


def targets_of(config: dict[str, Any], names: Iterable[str]) -> list[str]:
    return [name for name in names if is_target(config, name)]


def pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """A `rank_pattern` / `alpha_pattern` entry for the module (PEFT's `get_pattern_key`: the first key whose
    expression matches the end of the name at a dot), else the default."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return pattern[key]
    return default


def is_feedforward(config: dict[str, Any], name: str) -> bool:
    """IA3: whether the module's input is scaled (a feedforward module) rather than its output."""
    feedforward = config.get("feedforward_modules")
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(key) for key in feedforward or [])
