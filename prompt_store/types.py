"""Plain records shared by the store, the cache and the engine."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only for the annotations: the start-up checks read these types without loading it
    import torch

TaskKey = tuple[str, int]  # (task_id, version)

# PEFT's task types: generation (a causal LM, an encoder-decoder) and classification (a head on the hidden states)
CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS = "CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS"
CLASSIFICATION_TYPES = (SEQ_CLS, TOKEN_CLS)
LABELS_DIM = -1  # in a HeadSpec shape: where the task's number of labels goes


class Method(enum.StrEnum):
    PROMPT_TUNING = "prompt_tuning"
    P_TUNING = "p_tuning"
    PREFIX_TUNING = "prefix_tuning"
    LORA = "lora"
    IA3 = "ia3"

    @property
    def is_prefix(self) -> bool:
        return self is Method.PREFIX_TUNING

    @property
    def is_prompt_learning(self) -> bool:
        """PEFT's prompt learning: virtual tokens or a prefix. LoRA and IA3 change the backbone's modules instead."""
        return self not in (Method.LORA, Method.IA3)


class ModuleKind(enum.StrEnum):
    """What a backbone module is, for an adapter that targets it."""

    LINEAR = "linear"  # torch.nn.Linear
    CONV1D = "conv1d"  # transformers' Conv1D (GPT-2): a linear layer whose weight is stored [in, out]
    EMBEDDING = "embedding"
    HEAD = "head"  # run apart from the shared pass: the output layer, a classification head, its pooler
    EXPERT = "expert"  # a linear layer of a mixture's expert: it sees only the tokens routed to it
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class ModuleShape:
    """One module of the backbone, named as in the model PEFT wraps (`model.layers.0.self_attn.q_proj`)."""

    name: str
    kind: ModuleKind
    type_name: str  # its class, for messages
    in_features: int = 0  # linear and Conv1D modules only
    out_features: int = 0


@dataclass(frozen=True, slots=True)
class HeadSpec:
    """A classification head the backbone can run for a task type: the tensors a PEFT adapter must carry (named as
    in the head model, PEFT's `base_model.` prefix removed), shapes with LABELS_DIM for the number of labels, and
    those it may carry (a pooler the backbone's checkpoint has trained weights for)."""

    task_type: str
    required: tuple[tuple[str, tuple[int, ...]], ...]
    optional: tuple[tuple[str, tuple[int, ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class BackboneFingerprint:
    """What an adapter must match to run on the backbone (GQA-aware: prefixes are kv_heads * head_dim wide)."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    is_encoder_decoder: bool = False  # a seq2seq LM (T5, BART): adapters are PEFT SEQ_2_SEQ_LM ones
    num_decoder_layers: int | None = None  # seq2seq only: the layers a prefix reaches (num_layers is the encoder's)
    is_encoder: bool = False  # an encoder (BERT, RoBERTa, DeBERTa-v2): classification tasks only
    takes_prefix: bool = True  # False: PEFT cannot apply a prefix to its attention (DeBERTa-v2, multi-query Falcon)
    heads: tuple[HeadSpec, ...] = ()  # the classification task types it serves, and their heads
    modules: tuple[ModuleShape, ...] = ()  # every module, in the model's order: what LoRA and IA3 adapters target

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def task_type(self) -> str:
        """PEFT's task_type of the generation adapters this backbone serves (an encoder serves none)."""
        return "SEQ_2_SEQ_LM" if self.is_encoder_decoder else "CAUSAL_LM"

    @property
    def task_types(self) -> tuple[str, ...]:
        """Every PEFT task_type it serves: its generation type (not an encoder's), then its heads'."""
        generation = () if self.is_encoder else (self.task_type,)
        return (*generation, *(head.task_type for head in self.heads))

    def head(self, task_type: str) -> HeadSpec | None:
        return next((head for head in self.heads if head.task_type == task_type), None)

    @property
    def kind(self) -> str:
        if self.is_encoder:
            return "an encoder"
        return "an encoder-decoder" if self.is_encoder_decoder else "a causal"

    @property
    def num_transformer_submodules(self) -> int:
        """PEFT's: an encoder-decoder's prompt task holds an encoder and a decoder prompt (P rows each)."""
        return 2 if self.is_encoder_decoder else 1

    @property
    def prefix_layers(self) -> tuple[int, ...]:
        """For each layer a prefix's keys and values enter (an encoder-decoder's: its decoder self-attention layers),
        the saved layer PEFT gives it: layer l of a causal LM's; (2 * l) % L of an encoder-decoder's L saved ones."""
        if not self.is_encoder_decoder:
            return tuple(range(self.num_layers))
        return tuple((2 * layer) % self.num_layers for layer in range(self.num_decoder_layers or self.num_layers))


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One immutable version of a task, as the API reports it."""

    task_id: str
    version: int
    method: Method
    num_virtual_tokens: int
    bytes: int
    sha256: str
    created_at: str  # RFC 3339, UTC
    task_type: str = CAUSAL_LM
    labels: tuple[str, ...] | None = None  # a classification task's label names, by class id
    rank: int | None = None  # LoRA: the largest rank of its modules (None for every other method)

    @property
    def key(self) -> TaskKey:
        return (self.task_id, self.version)

    @property
    def is_classifier(self) -> bool:
        return self.task_type in CLASSIFICATION_TYPES

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "version": self.version,
            "method": self.method.value,
            "num_virtual_tokens": self.num_virtual_tokens,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "created_at": self.created_at,
            "task_type": self.task_type,
            "labels": list(self.labels) if self.labels is not None else None,
            "rank": self.rank,
        }


@dataclass(frozen=True, slots=True)
class LoraWeights:
    """One module's LoRA: its output gains scaling * B(A(x)) (PEFT's `lora_A` / `lora_B`, as saved)."""

    module: str
    lora_a: torch.Tensor  # [r, in_features]
    lora_b: torch.Tensor  # [out_features, r]
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])


@dataclass(frozen=True, slots=True)
class IA3Weights:
    """One module's IA3 vector: it scales the module's output, or a feedforward module's input (PEFT's `ia3_l`)."""

    module: str
    scales: torch.Tensor  # [out_features], or [in_features] for a feedforward module
    is_feedforward: bool


ModuleWeights = LoraWeights | IA3Weights


@dataclass(frozen=True, slots=True)
class TaskArtifact:
    """A validated task version on the CPU: the PEFT config, its `prompt_embeddings` tensor (none for LoRA and IA3:
    [0, hidden]), its per-module weights (LoRA and IA3) and, for a classification task, its head."""

    record: TaskRecord
    config: dict[str, Any]
    prompt_embeddings: torch.Tensor  # prompt/P-tuning: [P, hidden]; prefix: [P, num_layers * 2 * kv_dim]
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # HeadSpec names -> tensors (classification)
    modules: tuple[ModuleWeights, ...] = ()  # LoRA / IA3: one entry per target module, in the model's order

    @property
    def key(self) -> TaskKey:
        return self.record.key

    @property
    def nbytes(self) -> int:
        return nbytes([self.prompt_embeddings, *self.head.values(), *module_tensors(self.modules)])


def module_tensors(modules: Iterable[ModuleWeights]) -> list[torch.Tensor]:
    return [t for m in modules for t in ((m.lora_a, m.lora_b) if isinstance(m, LoraWeights) else (m.scales,))]


@dataclass(slots=True)
class DeviceTask:
    """A task materialised for serving, in the backbone's dtype and on its device."""

    key: TaskKey
    method: Method
    num_virtual_tokens: int
    prompt_embeds: torch.Tensor | None = None  # [P, hidden]
    prefix_keys: list[torch.Tensor] = field(default_factory=list)  # per layer [kv_heads, P, head_dim]
    prefix_values: list[torch.Tensor] = field(default_factory=list)  # per layer [kv_heads, P, head_dim]

    @property
    def nbytes(self) -> int:
        embeds = [] if self.prompt_embeds is None else [self.prompt_embeds]
        return nbytes([*self.prefix_keys, *self.prefix_values, *embeds])


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of the device-side prompt cache, for the metrics layer."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    resident_bytes: int = 0
    num_entries: int = 0
    num_pinned: int = 0
    resident_tasks: tuple[TaskKey, ...] = ()  # users' task versions held on the device (the engine's own left out)
    max_resident_tasks: int = 0  # about how many tasks the device holds at once (see TaskCache.stats)
    adapter_bytes: int = 0  # of resident_bytes: LoRA and IA3 weights in the adapter pool
    num_adapters: int = 0  # LoRA and IA3 task versions in the adapter pool
    adapter_capacity_bytes: int = 0  # the adapter pool's byte budget


@dataclass(frozen=True, slots=True)
class HostCacheStats:
    """The store's host tier of LoRA and IA3 tasks (parsed in CPU memory), for the metrics layer."""

    hits: int = 0  # loads served from host memory
    misses: int = 0  # loads that read the store
    num_entries: int = 0
    num_bytes: int = 0
    max_entries: int = 0  # max_cpu_loras


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """The bytes these tensors' elements take (every tensor byte count in the store and the engine is this sum)."""
    return sum(tensor.nbytes for tensor in tensors)
