"""Plain records shared by the store, the cache and the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

TaskKey = tuple[str, int]  # (task_id, version)


class Method(enum.StrEnum):
    PROMPT_TUNING = "prompt_tuning"
    P_TUNING = "p_tuning"
    PREFIX_TUNING = "prefix_tuning"

    @property
    def is_prefix(self) -> bool:
        return self is Method.PREFIX_TUNING


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

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def task_type(self) -> str:
        """PEFT's task_type of the adapters this backbone serves."""
        return "SEQ_2_SEQ_LM" if self.is_encoder_decoder else "CAUSAL_LM"

    @property
    def kind(self) -> str:
        return "an encoder-decoder" if self.is_encoder_decoder else "a causal"


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

    @property
    def key(self) -> TaskKey:
        return (self.task_id, self.version)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "version": self.version,
            "method": self.method.value,
            "num_virtual_tokens": self.num_virtual_tokens,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "created_at": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class TaskArtifact:
    """A validated task version on the CPU: the PEFT config and its `prompt_embeddings` tensor."""

    record: TaskRecord
    config: dict[str, Any]
    prompt_embeddings: torch.Tensor  # prompt/P-tuning: [P, hidden]; prefix: [P, num_layers * 2 * kv_dim]

    @property
    def key(self) -> TaskKey:
        return self.record.key


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
        tensors = [*self.prefix_keys, *self.prefix_values]
        if self.prompt_embeds is not None:
            tensors.append(self.prompt_embeds)
        return sum(t.numel() * t.element_size() for t in tensors)


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
