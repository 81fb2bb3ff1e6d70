"""Classification heads (PEFT `SEQ_CLS` and `TOKEN_CLS` tasks) run over the backbone's hidden states.

Each task brings its own head (PEFT saves it through `modules_to_save`: `classifier` or `score`), so a step's rows of
many tasks share the backbone's forward pass and then each task's head runs on its own rows' hidden states. The
heads are transformers' own modules: built once per task type on the meta device from the backbone's config (no
memory), and called with a task's tensors through `torch.func.functional_call`. The tensors a task must carry, and
their shapes (with the number of labels left open), are read off those modules: nothing here names a family.

A sequence head reads one token per row, as transformers' `*ForSequenceClassification` does: an encoder's first
token (its [CLS]; a prompt task's first virtual token, where PEFT puts them) through the model's pooler if it has
one (BERT's, DeBERTa-v2's), a causal LM's last token. A token head reads every input token.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PretrainedConfig,
    PreTrainedModel,
)

from prompt_store.types import LABELS_DIM, SEQ_CLS, TOKEN_CLS, HeadSpec

logger = logging.getLogger(__name__)

HEAD_MODULES = ("classifier", "score")  # PEFT's modules_to_save for SEQ_CLS and TOKEN_CLS
AUTO_CLASSES = {SEQ_CLS: AutoModelForSequenceClassification, TOKEN_CLS: AutoModelForTokenClassification}
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class Head:
    """One task type's head modules (on the meta device: a task's tensors stand in for their weights)."""

    task_type: str
    module_name: str  # "classifier" or "score", as in the head model
    module: torch.nn.Module
    pooler_name: str | None  # e.g. "pooler" (DeBERTa-v2) or "bert.pooler" (BERT): sequence heads read through it
    pooler: torch.nn.Module | None
    spec: HeadSpec
    backbone_pooler: Tensors  # the pooler's trained weights from the backbone's checkpoint (empty: a task brings them)

    def logits(self, features: torch.Tensor, tensors: Tensors) -> torch.Tensor:
        """features [R, 1, H] (a sequence head: each row's token) or [n, H] (a token head) -> float32 logits."""
        x = features
        if self.pooler is not None:
            x = functional_call(self.pooler, self.pooler_tensors(tensors), (x,))
        out = functional_call(self.module, own(tensors, self.module_name), (x,))
        return out.reshape(features.shape[0], -1).float()

    def pooler_tensors(self, tensors: Tensors) -> Tensors:
        assert self.pooler_name is not None
        return own(tensors, self.pooler_name) or self.backbone_pooler


@dataclass(frozen=True, slots=True)
class BareHead:
    """The backbone checkpoint's own trained head (a fine-tuned classifier), served with no task."""

    task_type: str
    tensors: Tensors
    labels: tuple[str, ...]


def own(tensors: Tensors, module_name: str) -> Tensors:
    """The tensors of one module, named relative to it."""
    prefix = module_name + "."
    return {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}


def head_model(config: PretrainedConfig, task_type: str, num_labels: int) -> PreTrainedModel | None:
    """The task type's head model for this config, on the meta device; None if transformers has none."""
    config = copy.deepcopy(config)
    config.num_labels = num_labels
    try:
        with torch.device("meta"):
            return AUTO_CLASSES[task_type].from_config(config)
    except (ValueError, KeyError):
        return None


def build_head(config: PretrainedConfig, task_type: str, loaded: PreTrainedModel, missing: set[str]) -> Head | None:
    """The head of `task_type` on this backbone, its spec read off two builds (2 and 3 labels)."""
    two, three = head_model(config, task_type, 2), head_model(config, task_type, 3)
    if two is None or three is None:
        return None
    module_name = next((name for name in HEAD_MODULES if isinstance(getattr(two, name, None), torch.nn.Module)), None)
    if module_name is None:
        logger.info("no %s head: %s has none of the modules %s", task_type, type(two).__name__, HEAD_MODULES)
        return None
    shapes3 = {name: tuple(p.shape) for name, p in three.named_parameters()}
    required = [
        (name, tuple(LABELS_DIM if a != b else a for a, b in zip(p.shape, shapes3[name], strict=True)))
        for name, p in two.named_parameters()
        if name.startswith(module_name + ".")
    ]
    pooler_name = pooler_of(two) if task_type == SEQ_CLS else None
    if (unrun := unrun_modules(two, module_name, pooler_name)) is not None:
        logger.warning("no %s head: %s reads its features through %s, which promptserve's heads do not run",
                       task_type, type(two).__name__, unrun)  # fmt: skip
        return None
    pooler_shapes = [
        (n, tuple(p.shape)) for n, p in two.named_parameters() if pooler_name and n.startswith(pooler_name + ".")
    ]
    trained = trained_tensors(loaded, [name for name, _ in pooler_shapes], missing)
    spec = HeadSpec(
        task_type, (*required, *([] if trained else pooler_shapes)), tuple(pooler_shapes) if trained else ()
    )
    pooler = two.get_submodule(pooler_name).eval() if pooler_name else None
    pooler_weights = {n.removeprefix(f"{pooler_name}."): t for n, t in trained.items()}
    return Head(task_type, module_name, getattr(two, module_name).eval(), pooler_name, pooler, spec, pooler_weights)


def pooler_of(model: PreTrainedModel) -> str | None:
    """Where a sequence head model pools its first token: its own `pooler` (DeBERTa-v2) or its encoder's (BERT)."""
    if isinstance(getattr(model, "pooler", None), torch.nn.Module):
        return "pooler"
    base = model.base_model
    if base is not model and isinstance(getattr(base, "pooler", None), torch.nn.Module):
        return f"{model.base_model_prefix}.pooler"
    return None


def unrun_modules(model: PreTrainedModel, module_name: str, pooler_name: str | None) -> str | None:
    """What a head model applies between its base model and its head module that `Head.logits` would skip: its
    own layers (DistilBERT's `pre_classifier`), or a bare linear pooler whose activation it applies elsewhere
    (ALBERT's `pooler_activation`); None if nothing."""
    run = (f"{model.base_model_prefix}.", f"{module_name}.", *([f"{pooler_name}."] if pooler_name else []))
    unrun = sorted({name.rsplit(".", 1)[0] for name, _ in model.named_parameters() if not name.startswith(run)})
    if unrun:
        return ", ".join(unrun)
    if pooler_name and isinstance(model.get_submodule(pooler_name), torch.nn.Linear):
        return f"the bare linear {pooler_name} and an activation outside it"
    return None


def trained_tensors(loaded: PreTrainedModel, names: list[str], missing: set[str]) -> Tensors:
    """The loaded model's tensors of these names, if its checkpoint had every one of them (else {})."""
    state = dict(loaded.named_parameters())
    if not names or any(name in missing or name not in state for name in names):
        return {}
    return {name: state[name].detach() for name in names}


def bare_head(
    config: PretrainedConfig, task_type: str, loaded: PreTrainedModel, head: Head, missing: set[str]
) -> BareHead | None:
    """The checkpoint's own head, if it was trained (a fine-tuned classifier), with its config's label names."""
    names = [name for name, _ in head.spec.required]
    tensors = trained_tensors(loaded, names, missing)
    if not tensors:
        return None
    name, shape = next((name, shape) for name, shape in head.spec.required if LABELS_DIM in shape)
    num_labels = tensors[name].shape[shape.index(LABELS_DIM)]
    id2label: dict[Any, Any] = dict(getattr(config, "id2label", None) or {})
    labels = tuple(str(id2label.get(i, f"LABEL_{i}")) for i in range(num_labels))
    return BareHead(task_type, tensors, labels)
