"""Reads and validates PEFT prompt-learning adapters (`adapter_config.json` + `adapter_model.safetensors`).

Only safetensors is read, never pickle. Every refusal says what was expected and what was found.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

from safetensors import SafetensorError

from prompt_store.errors import InvalidTask, TaskTooLarge
from prompt_store.modules import (
    MODULE_PREFIX,
    check_rank,
    check_settings,
    check_targets_config,
    check_task_type_modules,
    expected_tensors,
    module_weights,
    resolve_targets,
)
from prompt_store.types import (
    CLASSIFICATION_TYPES,
    LABELS_DIM,
    BackboneFingerprint,
    HeadSpec,
    LoraWeights,
    Method,
    ModuleWeights,
)

if TYPE_CHECKING:  # torch is imported where tensors are read: the start-up checks use this module without it
    import torch

TASK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_TASK_ID_RE = re.compile(TASK_ID_PATTERN)

CONFIG_NAME = "adapter_config.json"
MODEL_NAME = "adapter_model.safetensors"
TENSOR_KEY = "prompt_embeddings"
HEAD_PREFIX = "base_model."  # PEFT saves a head (`modules_to_save`) under the model's own names, after this
MAX_LABEL_CHARS = 256

PEFT_TYPES = {
    "PROMPT_TUNING": Method.PROMPT_TUNING,
    "P_TUNING": Method.P_TUNING,
    "PREFIX_TUNING": Method.PREFIX_TUNING,
    "LORA": Method.LORA,
    "IA3": Method.IA3,
}
# safetensors dtype codes of floating-point tensors; anything else cannot be a prompt.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_HEADER_LEN_BYTES = 8
# torch.save's zip archive, and a pickle of protocol 2 or later (torch.save's legacy format)
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass(frozen=True, slots=True)
class AdapterContent:
    """A validated adapter: its config, method, task type, prompt tensor and (classification) head and labels."""

    config: dict[str, Any]
    method: Method
    task_type: str
    prompt: torch.Tensor
    head: dict[str, torch.Tensor]
    labels: tuple[str, ...] | None  # classification: one name per label (LABEL_i unless given)
    modules: tuple[ModuleWeights, ...] = ()  # LoRA / IA3: each target module's weights (prompt: [0, hidden])

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.config["num_virtual_tokens"]) if self.method.is_prompt_learning else 0

    @property
    def rank(self) -> int | None:
        """LoRA: the largest rank of its modules."""
        ranks = [module.rank for module in self.modules if isinstance(module, LoraWeights)]
        return max(ranks) if ranks else None


@dataclass(frozen=True, slots=True)
class StoreLimits:
    max_virtual_tokens: int = 256
    max_config_bytes: int = 64 * 1024
    max_model_bytes: int = 64 * 1024 * 1024
    max_lora_rank: int = 64


def validate_task_id(task_id: str) -> str:
    """Return the id unchanged, or raise InvalidTask; ids become directory names, so this guards paths too."""
    # fullmatch: with `$` alone a trailing newline would slip through.
    if not isinstance(task_id, str) or _TASK_ID_RE.fullmatch(task_id) is None:
        raise InvalidTask(f"task_id must match {TASK_ID_PATTERN}; found {task_id!r}")
    return task_id


def is_valid_task_id(task_id: str) -> bool:
    return isinstance(task_id, str) and _TASK_ID_RE.fullmatch(task_id) is not None


def parse_adapter(
    adapter_config: bytes,
    adapter_model: bytes,
    fingerprint: BackboneFingerprint,
    limits: StoreLimits,
    labels: bytes | None = None,
) -> AdapterContent:
    """Validate an adapter (and a classification task's label names) against the backbone."""
    check_sizes(len(adapter_config), len(adapter_model), limits)
    config = parse_config(adapter_config)
    method, task_type = method_of(config, fingerprint)
    if not method.is_prompt_learning:
        return parse_module_adapter(config, adapter_model, method, task_type, fingerprint, limits, labels)
    num_virtual_tokens = virtual_tokens_of(config, limits)
    check_config_dims(config, method, fingerprint)
    head_spec = fingerprint.head(task_type)
    tensors = load_tensors(adapter_model, head_spec)
    tensor = tensors.pop(TENSOR_KEY)
    check_tensor_shape(tensor, method, num_virtual_tokens, fingerprint)
    check_finite(TENSOR_KEY, tensor)
    if head_spec is None:
        if labels is not None:
            raise InvalidTask(
                f"labels: expected none for a {task_type} task (label names are for {CLASSIFICATION_TYPES}); found some"
            )
        return AdapterContent(config, method, task_type, tensor, {}, None)
    head = {name.removeprefix(HEAD_PREFIX): t for name, t in tensors.items()}
    num_labels = check_head(head, head_spec)
    return AdapterContent(config, method, task_type, tensor, head, parse_labels(labels, num_labels))


def parse_module_adapter(
    config: dict[str, Any],
    adapter_model: bytes,
    method: Method,
    task_type: str,
    fingerprint: BackboneFingerprint,
    limits: StoreLimits,
    labels: bytes | None,
) -> AdapterContent:
    """A LoRA or IA3 adapter: its settings, its target modules on this backbone and exactly their tensors."""
    check_settings(config, method)
    check_targets_config(config)  # the shapes of the settings read below
    check_task_type_modules(config, task_type)
    if method is Method.LORA:
        check_rank(config, limits.max_lora_rank)
    targets = resolve_targets(config, method, fingerprint)
    head_spec = fingerprint.head(task_type)
    expected = expected_tensors(config, method, targets, head_spec)
    header = read_safetensors_header(adapter_model)
    check_module_shapes(header, expected_tensors(config, method, targets, None), config, fingerprint)
    check_module_entries(header, expected, head_spec, method, config, fingerprint)
    tensors = load_tensors(adapter_model, None, check_header=False)
    head_names = {MODULE_PREFIX + name for name, _ in (head_spec.required + head_spec.optional)} if head_spec else set()
    head = {name.removeprefix(MODULE_PREFIX): tensors.pop(name) for name in sorted(head_names & tensors.keys())}
    for name, tensor in sorted(tensors.items()):  # the target modules' tensors, of the shapes their headers gave
        check_finite(name, tensor)
    modules = module_weights(config, method, targets, tensors)
    import torch  # where tensors are read (see above)

    prompt = torch.zeros(0, fingerprint.hidden_size)  # [0, H]: no virtual tokens
    if head_spec is None:
        if labels is not None:
            raise InvalidTask(f"labels: expected none for a {task_type} task; found some")
        return AdapterContent(config, method, task_type, prompt, {}, None, modules)
    num_labels = check_head(head, head_spec)
    return AdapterContent(config, method, task_type, prompt, head, parse_labels(labels, num_labels), modules)


def check_module_shapes(
    header: dict[str, Any], expected: dict[str, tuple[int, ...]], config: dict[str, Any], fp: BackboneFingerprint
) -> None:
    """Each target module's tensor the file holds in the shape the backbone's module gives it (from the header)."""
    for name in sorted(expected.keys() & header.keys()):
        entry = header[name]
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if shape != list(expected[name]):
            raise InvalidTask(
                f"{MODEL_NAME}: {name} must have shape {list(expected[name])}; found {shape}{other_base(config, fp)}"
            )


def check_module_entries(
    header: dict[str, Any],
    expected: dict[str, Any],
    head: HeadSpec | None,
    method: Method,
    config: dict[str, Any],
    fp: BackboneFingerprint,
) -> None:
    """Exactly the tensors PEFT saves for the target modules (and a head's), each of a float dtype."""
    keys = {key for key in header if key != "__metadata__"}
    optional = {MODULE_PREFIX + name for name, _ in head.optional} if head else set()
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected) - optional)
    if missing or unexpected:
        # whole layers missing or extra: the adapter was saved from a backbone of another depth
        other_depth = layers_named(missing) - layers_named(keys) or layers_named(unexpected) - layers_named(expected)
        head_missing = head is not None and any(MODULE_PREFIX + name in missing for name, _ in head.required)
        raise InvalidTask(
            f"{MODEL_NAME}: expected the {len(expected)} tensors PEFT saves for this {method.name} adapter's target "
            f"modules on the backbone; missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected "
            f"{unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}{other_base(config, fp) if other_depth else ''}"
            f"{head_hint(head) if head is not None and head_missing else ''}"
        )
    for key in sorted(keys):
        entry = header[key]
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in FLOAT_DTYPES:
            raise InvalidTask(f"{MODEL_NAME}: {key} must have a float dtype {FLOAT_DTYPES}; found {dtype!r}")


def layers_named(names: Iterable[str]) -> set[int]:
    """The layer indices tensor names sit in (their first numbered segment)."""
    return {int(match.group(1)) for match in (re.search(r"\.(\d+)\.", name) for name in names) if match}


def other_base(config: dict[str, Any], fp: BackboneFingerprint) -> str:
    """The likely cause of tensors that fit the module names but not the backbone, said with both sides."""
    base = config.get("base_model_name_or_path")
    saved = f" ({base!r})" if isinstance(base, str) and base else ""
    return (
        f": an adapter of another base model{saved}? this {fp.model_type} backbone has {fp.num_layers} layers of "
        f"hidden size {fp.hidden_size}"
    )


def check_sizes(config_bytes: int, model_bytes: int, limits: StoreLimits) -> None:
    if config_bytes > limits.max_config_bytes:
        raise TaskTooLarge(f"{CONFIG_NAME}: expected at most {limits.max_config_bytes} bytes; found {config_bytes}")
    if model_bytes > limits.max_model_bytes:
        raise TaskTooLarge(f"{MODEL_NAME}: expected at most {limits.max_model_bytes} bytes; found {model_bytes}")


def parse_config(adapter_config: bytes) -> dict[str, Any]:
    try:
        config = json.loads(adapter_config)
    except (ValueError, RecursionError) as exc:  # malformed, not UTF-8, too deeply nested, an over-long integer
        raise InvalidTask(f"{CONFIG_NAME}: expected a JSON object; found malformed JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidTask(f"{CONFIG_NAME}: expected a JSON object; found {type(config).__name__}")
    return config


def method_of(config: dict[str, Any], fingerprint: BackboneFingerprint) -> tuple[Method, str]:
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPES:
        supported = ", ".join(PEFT_TYPES)
        raise InvalidTask(f"{CONFIG_NAME}: peft_type must be one of {supported}; found {peft_type!r}")
    task_type = config.get("task_type")
    if task_type not in fingerprint.task_types:
        expected = " or ".join(repr(t) for t in fingerprint.task_types)
        raise InvalidTask(
            f"{CONFIG_NAME}: task_type must be {expected} ({fingerprint.kind} {fingerprint.model_type} backbone); "
            f"found {task_type!r}"
        )
    method = PEFT_TYPES[peft_type]
    if method.is_prefix and not fingerprint.takes_prefix:
        raise InvalidTask(
            f"{CONFIG_NAME}: peft_type must be PROMPT_TUNING or P_TUNING on this {fingerprint.model_type} backbone "
            f"(PEFT cannot apply a prefix to its attention either); found {peft_type!r}"
        )
    # PEFT fills a missing value with 1 for a causal LM and 2 for an encoder-decoder (encoder and decoder prompts).
    expected_submodules = fingerprint.num_transformer_submodules
    submodules = config.get("num_transformer_submodules", expected_submodules)
    if submodules is not None and submodules != expected_submodules:
        raise InvalidTask(
            f"{CONFIG_NAME}: num_transformer_submodules must be {expected_submodules} ({task_type}); "
            f"found {submodules!r}"
        )
    return method, str(task_type)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def virtual_tokens_of(config: dict[str, Any], limits: StoreLimits) -> int:
    num = config.get("num_virtual_tokens")
    if not _is_int(num) or num < 1:
        raise InvalidTask(f"{CONFIG_NAME}: num_virtual_tokens must be a positive integer; found {num!r}")
    if num > limits.max_virtual_tokens:
        raise TaskTooLarge(
            f"{CONFIG_NAME}: num_virtual_tokens must be at most {limits.max_virtual_tokens}; found {num}"
        )
    return int(num)


def expected_config_dims(method: Method, fingerprint: BackboneFingerprint) -> dict[str, tuple[int, str]]:
    """Config field -> (value the backbone needs, why). A missing field is left to PEFT, which derives the same."""
    fp = fingerprint
    if not method.is_prefix:
        return {"token_dim": (fp.hidden_size, "hidden_size"), "num_layers": (fp.num_layers, "num_layers")}
    # PEFT views prefixes per KV head: with grouped-query attention these are the KV heads, not the query heads.
    kv_why = f"num_key_value_heads {fp.num_key_value_heads} x head_dim {fp.head_dim}"
    return {
        "token_dim": (fp.kv_dim, kv_why),
        "num_layers": (fp.num_layers, "num_layers"),
        "num_attention_heads": (fp.num_key_value_heads, "num_key_value_heads"),
    }


def check_config_dims(config: dict[str, Any], method: Method, fingerprint: BackboneFingerprint) -> None:
    decoder_layers = fingerprint.num_decoder_layers or 0
    if method.is_prefix and decoder_layers > fingerprint.num_layers:
        raise InvalidTask(
            f"{CONFIG_NAME}: prefix tuning on this {fingerprint.model_type} backbone: PEFT provisions a prefix for "
            f"as many decoder layers as the encoder has ({fingerprint.num_layers}); its decoder has {decoder_layers}, "
            "so PEFT itself cannot run such an adapter"
        )
    for name, (expected, why) in expected_config_dims(method, fingerprint).items():
        found = config.get(name)
        if found is not None and (not _is_int(found) or found != expected):
            raise InvalidTask(
                f"{CONFIG_NAME}: {name} must be {expected} ({why} of the {fingerprint.model_type} backbone); "
                f"found {found!r}"
            )


def read_safetensors_header(adapter_model: bytes) -> dict[str, Any]:
    """Parse the JSON header ourselves first: this rejects pickles and other formats before any decoding."""
    if len(adapter_model) < _HEADER_LEN_BYTES:
        raise InvalidTask(f"{MODEL_NAME}: expected a safetensors file; found {len(adapter_model)} bytes")
    header_len = int.from_bytes(adapter_model[:_HEADER_LEN_BYTES], "little")
    if header_len > len(adapter_model) - _HEADER_LEN_BYTES and adapter_model.startswith(PICKLE_MAGIC):
        raise InvalidTask(
            f"{MODEL_NAME}: expected a safetensors file (only safetensors is read, never pickle); found a PyTorch "
            "pickle (as torch.save and save_pretrained(safe_serialization=False) write adapter_model.bin): save the "
            "adapter with safe_serialization=True, PEFT's default"
        )
    if header_len > len(adapter_model) - _HEADER_LEN_BYTES:
        raise InvalidTask(
            f"{MODEL_NAME}: expected a safetensors file (only safetensors is read, never pickle); found a header "
            f"length of {header_len} in a {len(adapter_model)}-byte file"
        )
    try:
        header = json.loads(adapter_model[_HEADER_LEN_BYTES : _HEADER_LEN_BYTES + header_len])
    except (ValueError, RecursionError):
        raise InvalidTask(f"{MODEL_NAME}: expected a safetensors file; found an unreadable header") from None
    if not isinstance(header, dict):
        raise InvalidTask(f"{MODEL_NAME}: expected a safetensors header object; found {type(header).__name__}")
    return header


def check_header_entries(header: dict[str, Any], head: HeadSpec | None) -> None:
    """The prompt tensor and, for a classification task, exactly its head's tensors: 2-D (a bias 1-D), float."""
    keys = sorted(key for key in header if key != "__metadata__")
    expected = [TENSOR_KEY] if head is None else [TENSOR_KEY, *(HEAD_PREFIX + name for name, _ in head.required)]
    allowed = set(expected) | {HEAD_PREFIX + name for name, _ in head.optional} if head else set(expected)
    if not set(expected) <= set(keys) or not set(keys) <= allowed:
        what = f"the tensors {sorted(expected)}" if head else f"exactly one tensor {TENSOR_KEY!r}"
        optional = f" (and optionally {sorted(allowed - set(expected))})" if allowed - set(expected) else ""
        raise InvalidTask(f"{MODEL_NAME}: expected {what}{optional}; found {keys}{head_hint(head) if head else ''}")
    for key in keys:
        entry = header[key]
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in FLOAT_DTYPES:
            raise InvalidTask(f"{MODEL_NAME}: {key} must have a float dtype {FLOAT_DTYPES}; found {dtype!r}")
        shape = entry.get("shape")
        if key == TENSOR_KEY and (not isinstance(shape, list) or len(shape) != 2):
            raise InvalidTask(f"{MODEL_NAME}: {TENSOR_KEY} must be a 2-D tensor; found shape {shape!r}")


def head_hint(head: HeadSpec) -> str:
    """The modules_to_save that make PEFT save the head: with its pooler where the backbone's checkpoint has none
    trained (a BERT or DeBERTa-v2 saved from its masked-LM model), as PEFT's default names the head alone."""
    parts = [name.split(".") for name, _ in head.required]
    modules = list(dict.fromkeys("pooler" if "pooler" in part else part[0] for part in parts))
    return f"; PEFT saves a {head.task_type} task's head when modules_to_save names it: {modules}"


def load_tensors(adapter_model: bytes, head: HeadSpec | None, check_header: bool = True) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_safetensors

    if check_header:
        check_header_entries(read_safetensors_header(adapter_model), head)
    try:
        return dict(load_safetensors(adapter_model))
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise InvalidTask(f"{MODEL_NAME}: expected a valid safetensors file; found {exc}") from None


def check_head(head: dict[str, torch.Tensor], spec: HeadSpec) -> int:
    """Every head tensor's shape against the backbone's head; returns the number of labels (the same in all)."""
    shapes = dict(spec.required) | dict(spec.optional)
    num_labels: int | None = None
    for name, tensor in sorted(head.items()):
        expected, found = shapes[name], tuple(tensor.shape)
        labels = {f for e, f in zip(expected, found, strict=False) if e == LABELS_DIM}
        fits = len(found) == len(expected) and all(e in (f, LABELS_DIM) for e, f in zip(expected, found, strict=True))
        if not fits or len(labels) > 1 or (num_labels is not None and labels and labels != {num_labels}):
            shown = [("num_labels" if e == LABELS_DIM else e) for e in expected]
            also = f" with num_labels {num_labels} as in the other head tensors" if num_labels is not None else ""
            raise InvalidTask(f"{MODEL_NAME}: {HEAD_PREFIX}{name} must have shape {shown}{also}; found {list(found)}")
        if labels:
            num_labels = labels.pop()
        check_finite(HEAD_PREFIX + name, tensor)
    if num_labels is None or num_labels < 1:
        raise InvalidTask(f"{MODEL_NAME}: expected a head with at least one label; found {num_labels}")
    return num_labels


def parse_labels(labels: bytes | None, num_labels: int) -> tuple[str, ...]:
    """The label names given at registration (a JSON array of strings, class i at index i), else LABEL_i."""
    if labels is None:
        return tuple(f"LABEL_{i}" for i in range(num_labels))
    try:
        names = json.loads(labels)
    except (ValueError, RecursionError) as exc:
        raise InvalidTask(f"labels: expected a JSON array of label names; found malformed JSON ({exc})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and 0 < len(n) <= MAX_LABEL_CHARS for n in names):
        raise InvalidTask(
            f"labels: expected a JSON array of non-empty strings (at most {MAX_LABEL_CHARS} characters); "
            f"found {str(names)[:200]}"
        )
    if len(names) != num_labels:
        raise InvalidTask(f"labels: expected {num_labels} names (the head's number of labels); found {len(names)}")
    if len(set(names)) != len(names):
        raise InvalidTask(f"labels: expected distinct names; found {names}")
    return tuple(names)


def expected_tensor_shape(method: Method, num_virtual_tokens: int, fp: BackboneFingerprint) -> tuple[list[int], str]:
    if not method.is_prefix:  # an encoder-decoder's PEFT saves an encoder and a decoder prompt
        copies = fp.num_transformer_submodules
        rows = f"{copies} * num_virtual_tokens" if copies > 1 else "num_virtual_tokens"
        return [copies * num_virtual_tokens, fp.hidden_size], f"{rows} x hidden_size"
    width = fp.num_layers * 2 * fp.kv_dim
    why = f"num_virtual_tokens x num_layers {fp.num_layers} * 2 * num_key_value_heads {fp.num_key_value_heads}"
    return [num_virtual_tokens, width], f"{why} * head_dim {fp.head_dim}"


def check_tensor_shape(tensor: torch.Tensor, method: Method, num_virtual_tokens: int, fp: BackboneFingerprint) -> None:
    expected, why = expected_tensor_shape(method, num_virtual_tokens, fp)
    if list(tensor.shape) != expected:
        raise InvalidTask(f"{MODEL_NAME}: {TENSOR_KEY} must have shape {expected} ({why}); found {list(tensor.shape)}")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    import torch

    num_bad = int((~torch.isfinite(tensor)).sum())
    if num_bad:
        raise InvalidTask(f"{MODEL_NAME}: {name} must be finite; found {num_bad} NaN or Inf values")
