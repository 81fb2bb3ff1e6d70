"""The self-check's LoRA and IA3 rows: a task of each on every linear layer of the shared pass, random weights large
enough to move the logits; the reference applies them with hooks of its own around the backbone's stock forward.

The engine's hooks apply each row's deltas to its own tokens in the packed stream (or a padded batch); the reference
applies them to every token of a row run alone, through the modules the backbone's own forward calls. A module the
engine's path skips, a token mapping that goes wrong, or a module the backbone also runs on something that is not
the tokens shows here. Such a module (DeBERTa-v3's query and key projections, which also project the relative
positions) is named in a warning and left out: LoRA and IA3 tasks targeting it are refused from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from prompt_store.types import IA3Weights, LoraWeights, Method, ModuleKind, ModuleWeights, TaskArtifact, TaskRecord
from server.engine.backbone import Backbone

logger = logging.getLogger(__name__)

RANK = 2
# A and B of unit variance over their inputs, so a delta about a quarter of the module's output: it moves the logits
# far past float32's tolerance, and a 32-layer bfloat16 Llama's LoRA row strays no further than its plain rows (at
# 0.5: 0.21 nats, near the 0.25 tolerance; benchmarks.bf16_tolerance)
SCALING = 0.25
IA3_SPREAD = 0.2  # its vectors around 1


def module_tasks(backbone: Backbone, task_id: str, unservable: set[str], seed: int) -> list[TaskArtifact]:
    """A LoRA task and an IA3 task (every other module's vector on its input, as feedforward modules take it) on the
    linear layers of the shared pass, but `unservable`."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [
        shape for shape in backbone.fingerprint.modules
        if shape.kind in (ModuleKind.LINEAR, ModuleKind.CONV1D) and shape.name in backbone.modules
        and shape.name not in unservable
    ]  # fmt: skip
    lora: list[ModuleWeights] = []
    ia3: list[ModuleWeights] = []
    for i, shape in enumerate(shapes):
        lora_a = torch.randn(RANK, shape.in_features, generator=generator) / shape.in_features**0.5
        lora_b = torch.randn(shape.out_features, RANK, generator=generator) / RANK**0.5
        lora.append(LoraWeights(shape.name, lora_a, lora_b, SCALING))
        is_feedforward = i % 2 == 1
        size = shape.in_features if is_feedforward else shape.out_features
        ia3.append(IA3Weights(shape.name, 1 + IA3_SPREAD * torch.randn(size, generator=generator), is_feedforward))
    hidden = backbone.fingerprint.hidden_size
    return [artifact(f"{task_id}.lora", Method.LORA, lora, hidden), artifact(f"{task_id}.ia3", Method.IA3, ia3, hidden)]


def artifact(task_id: str, method: Method, modules: list[ModuleWeights], hidden_size: int) -> TaskArtifact:
    """As the store parses one: no prompt embeddings ([0, H])."""
    rank = RANK if method is Method.LORA else None
    record = TaskRecord(task_id, 0, method, 0, bytes=0, sha256="", created_at="", rank=rank)
    return TaskArtifact(record, {}, torch.zeros(0, hidden_size), modules=tuple(modules))


@contextmanager
def reference_deltas(backbone: Backbone, task: TaskArtifact | None) -> Iterator[None]:
    """Inside, the backbone's own forward applies the task's LoRA or IA3 weights to every token (hooks of the
    reference's own, removed on leaving); a task without modules changes nothing."""
    handles = []
    dtype = torch.promote_types(backbone.dtype, torch.float32)  # PEFT's adapter weights in a bfloat16 model
    try:
        for weights in task.modules if task is not None else ():
            module = backbone.modules[weights.module]
            if isinstance(weights, LoraWeights):
                a, b = (t.to(backbone.device, dtype) for t in (weights.lora_a, weights.lora_b))
                handles.append(module.register_forward_hook(lora_hook(a, b, weights.scaling)))
            else:
                scales = weights.scales.to(backbone.device, dtype)
                hook = module.register_forward_pre_hook if weights.is_feedforward else module.register_forward_hook
                handles.append(hook(ia3_hook(scales, weights.is_feedforward)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def lora_hook(a: torch.Tensor, b: torch.Tensor, scaling: float) -> Any:
    """PEFT's LoRA forward: the delta in the weights' dtype, added to the output and rounded once to its dtype."""
    return lambda module, args, output: (output + F.linear(F.linear(args[0].to(a.dtype), a), b) * scaling).to(
        output.dtype
    )


def ia3_hook(scales: torch.Tensor, is_feedforward: bool) -> Any:
    if is_feedforward:
        return lambda module, args: ((args[0] * scales).to(args[0].dtype), *args[1:])
    return lambda module, args, output: (output * scales).to(output.dtype)


def warn_unservable(backbone: Backbone, unservable: dict[str, str]) -> None:
    if unservable:
        logger.warning(
            "LoRA and IA3 tasks cannot target %d module(s) of %s, which the backbone also runs on something other "
            "than the tokens; tasks targeting them are refused: %s",
            len(unservable), backbone.model_id, ", ".join(sorted(unservable)),
        )  # fmt: skip
