"""Reads and validates PEFT LoRA and IA3 adapters, as `save_pretrained` writes them, against the backbone's modules.

What is served: LoRA (`r`, `lora_alpha`, `use_rslora`, `rank_pattern`, `alpha_pattern`) and IA3 on linear layers
and GPT-2's Conv1D, targeted by name, regular expression, `layers_to_transform` / `layers_pattern` and
`exclude_modules` (targets.py); a classification head from `modules_to_save`. Anything else that changes what the
adapter computes (DoRA, LoRA on embeddings, trained biases, an initialisation that rewrites the base weights, any
option PEFT adds later) is refused, naming the setting.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prompt_store.errors import InvalidTask
from prompt_store.targets import is_feedforward, layer_index, pattern_value, targets_of
from prompt_store.types import (
    CLASSIFICATION_TYPES,
    BackboneFingerprint,
    HeadSpec,
    IA3Weights,
    LoraWeights,
    Method,
    ModuleKind,
    ModuleShape,
    ModuleWeights,
)

if TYPE_CHECKING:  # torch only for the annotations: the start-up checks import this module without it
    import torch

CONFIG_NAME = "adapter_config.json"
MODEL_NAME = "adapter_model.safetensors"
MODULE_PREFIX = (
    "base_model.model."  # PEFT saves a LoRA / IA3 model's tensors under the wrapped model's names, after this
)
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
IA3_SUFFIX = ".ia3_l"
SERVED_KINDS = (ModuleKind.LINEAR, ModuleKind.CONV1D)

# Settings that do not change what a saved adapter computes (bookkeeping, training-time options), or that are read
# below; every other setting must be off (None, false, empty) or the adapter is refused, naming it.
COMMON_SETTINGS = frozenset(
    {"peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
     "auto_mapping", "target_modules", "exclude_modules", "modules_to_save", "fan_in_fan_out"}
)  # fmt: skip
LORA_SETTINGS = COMMON_SETTINGS | {
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
    "lora_dropout", "init_lora_weights", "bias", "use_dora", "megatron_core", "qalora_group_size",
    "ensure_weight_tying", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
}  # fmt: skip
IA3_SETTINGS = COMMON_SETTINGS | {"feedforward_modules", "init_ia3_weights"}
# Initialisations that leave the base weights as they are (pissa, olora, corda, loftq and the like rewrite them)
SERVED_INITS = (True, False, "gaussian", "orthogonal", "eva")


def is_off(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def refuse(setting: str, expected: str, found: Any) -> InvalidTask:
    return InvalidTask(f"{CONFIG_NAME}: {setting} must be {expected}; found {found!r}")


def check_settings(config: dict[str, Any], method: Method) -> None:
    known = LORA_SETTINGS if method is Method.LORA else IA3_SETTINGS
    for setting, value in sorted(config.items()):
        if setting not in known and not is_off(value):
            raise refuse(setting, f"unset (not served for {method.name} adapters)", value)
    if method is not Method.LORA:
        return
    if config.get("use_dora"):
        raise refuse("use_dora", "false (DoRA is not served)", config["use_dora"])
    if config.get("bias", "none") != "none":
        raise refuse("bias", '"none" (trained biases are not served)', config["bias"])
    if config.get("init_lora_weights", True) not in SERVED_INITS:
        raise refuse("init_lora_weights", f"one of {list(SERVED_INITS)} (others rewrite the base weights)",
                     config["init_lora_weights"])  # fmt: skip
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise refuse("use_rslora", "false with rank_pattern or alpha_pattern (PEFT refuses both)", True)
    for setting in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(setting, False), bool):
            raise refuse(setting, "true or false", config[setting])


def check_targets_config(config: dict[str, Any]) -> None:
    """The shapes PEFT accepts for the target settings (regular expressions must compile)."""
    for setting in ("target_modules", "exclude_modules", "layers_pattern", "feedforward_modules"):
        value = config.get(setting)
        if value is None:
            continue
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            continue
        if not isinstance(value, str):
            raise refuse(setting, "a list of module names or a regular expression", value)
        try:
            re.compile(value)
        except re.error as exc:
            raise refuse(setting, f"a valid regular expression ({exc})", value) from None
    layers = config.get("layers_to_transform")
    if layers is not None and not (_is_int(layers) or (isinstance(layers, list) and all(_is_int(x) for x in layers))):
        raise refuse("layers_to_transform", "a layer index or a list of them", layers)
    for setting in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(setting) or {}
        if not isinstance(pattern, dict) or not all(_is_number(v) and v > 0 for v in pattern.values()):
            raise refuse(setting, "an object of module patterns to positive numbers", pattern)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def resolve_targets(config: dict[str, Any], method: Method, fingerprint: BackboneFingerprint) -> list[ModuleShape]:
    """The backbone modules PEFT puts this adapter on (its target settings checked: check_targets_config); each must
    be a linear layer or GPT-2's Conv1D."""
    if not fingerprint.modules:
        raise InvalidTask(f"{method.name} adapters: this store's backbone lists no modules to adapt")
    by_name = {module.name: module for module in fingerprint.modules}
    try:
        names = targets_of(config, by_name)
    except re.error as exc:
        raise refuse("layers_pattern", f"a valid regular expression ({exc})", config.get("layers_pattern")) from None
    if not names:
        check_layers_matched(config, by_name)
        raise refuse("target_modules", f"modules of the {fingerprint.model_type} backbone (none matched)",
                     config.get("target_modules"))  # fmt: skip
    for module in (by_name[name] for name in names):
        if module.kind is ModuleKind.EMBEDDING:
            raise refuse("target_modules", f"linear layers only ({method.name} on embeddings is not served)",
                         f"{module.name} ({module.type_name})")  # fmt: skip
        if module.kind is ModuleKind.HEAD:
            apart = "its output layer, classification head and pooler run apart from the shared pass: not served"
            raise refuse(
                "target_modules", f"layers inside the backbone ({apart})", f"{module.name} ({module.type_name})"
            )
        if module.kind is ModuleKind.EXPERT:
            expert = "a mixture's expert sees only the tokens routed to it: not served"
            raise refuse(
                "target_modules", f"layers every token passes ({expert})", f"{module.name} ({module.type_name})"
            )
        if module.kind not in SERVED_KINDS:
            raise refuse(
                "target_modules", "linear layers or GPT-2's Conv1D only", f"{module.name} ({module.type_name})"
            )
    return [by_name[name] for name in names]


def check_layers_matched(config: dict[str, Any], names: Iterable[str]) -> None:
    """Target modules that exist, but in none of the layers `layers_to_transform` lists: the layers are the mistake."""
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return
    in_any_layer = targets_of({**config, "layers_to_transform": None}, names)
    indices = sorted({i for i in (layer_index(config, name) for name in in_any_layer) if i is not None})
    if indices:
        raise refuse("layers_to_transform", f"layers the target modules sit in ({indices})", layers)


def expected_tensors(
    config: dict[str, Any], method: Method, targets: list[ModuleShape], head: HeadSpec | None
) -> dict[str, tuple[int, ...]]:
    """Every tensor the adapter file must hold (name as saved -> shape), a head's with its labels dimension open."""
    shapes: dict[str, tuple[int, ...]] = {}
    for module in targets:
        key = MODULE_PREFIX + module.name
        if method is Method.LORA:
            rank = pattern_value(config.get("rank_pattern") or {}, module.name, config.get("r", 8))
            shapes[key + LORA_SUFFIXES[0]] = (rank, module.in_features)
            shapes[key + LORA_SUFFIXES[1]] = (module.out_features, rank)
        elif is_feedforward(config, module.name):
            shapes[key + IA3_SUFFIX] = (1, module.in_features)
        else:
            shapes[key + IA3_SUFFIX] = (module.out_features, 1)
    for name, shape in head.required if head is not None else ():
        shapes[MODULE_PREFIX + name] = shape
    return shapes


def check_rank(config: dict[str, Any], max_rank: int) -> None:
    """`r` and every `rank_pattern` value within the server's maximum, the refusal naming the one above it."""
    ranks = {"r": config.get("r", 8)} | {
        f"rank_pattern[{key!r}]": r for key, r in (config.get("rank_pattern") or {}).items()
    }
    for setting, rank in ranks.items():
        if not (_is_int(rank) and rank > 0):
            raise refuse(setting, "a positive integer", rank)
    for setting, rank in ranks.items():
        if rank > max_rank:
            raise InvalidTask(
                f"{CONFIG_NAME}: {setting} must be at most the server's max_lora_rank {max_rank} "
                f"(PROMPTSERVE_MAX_LORA_RANK); found rank {rank}"
            )
    alphas = [config.get("lora_alpha", 8), *(config.get("alpha_pattern") or {}).values()]
    if not all(_is_number(a) for a in alphas):
        raise refuse("lora_alpha", "a finite number (and so every alpha_pattern value)", alphas)


def module_weights(
    config: dict[str, Any], method: Method, targets: list[ModuleShape], tensors: dict[str, torch.Tensor]
) -> tuple[ModuleWeights, ...]:
    """Each target module's weights, with PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) (use_rslora)."""
    weights: list[ModuleWeights] = []
    for module in targets:
        key = MODULE_PREFIX + module.name
        if method is Method.IA3:
            scales = tensors[key + IA3_SUFFIX].flatten()
            weights.append(IA3Weights(module.name, scales, is_feedforward(config, module.name)))
            continue
        rank = pattern_value(config.get("rank_pattern") or {}, module.name, config.get("r", 8))
        alpha = pattern_value(config.get("alpha_pattern") or {}, module.name, config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        lora_a, lora_b = (tensors[key + suffix] for suffix in LORA_SUFFIXES)
        weights.append(LoraWeights(module.name, lora_a, lora_b, float(scaling)))
    return tuple(weights)


def check_task_type_modules(config: dict[str, Any], task_type: str) -> None:
    if task_type not in CLASSIFICATION_TYPES and not is_off(config.get("modules_to_save")):
        raise refuse("modules_to_save", f"unset for a {task_type} adapter (whole trained modules are not served "
                     "beside it, except a classification head)", config["modules_to_save"])  # fmt: skip
    feedforward, targets = config.get("feedforward_modules"), config.get("target_modules")
    if isinstance(feedforward, list) and isinstance(targets, list) and not set(feedforward) <= set(targets):
        raise refuse("feedforward_modules", f"a subset of target_modules {sorted(targets)}", feedforward)
