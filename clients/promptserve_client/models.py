"""Typed responses of the promptserve API (version 1). Unknown fields are ignored, so newer servers still parse."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(protected_namespaces=(), frozen=True)


class Token(_Model):
    id: int
    text: str
    logprob: float | None = None


class Member(_Model):
    task_id: str | None
    task_version: int | None
    generated_text: str


class Details(_Model):
    finish_reason: str  # length | eos_token | stop_sequence
    generated_tokens: int
    input_tokens: int
    task_id: str | None = None
    task_version: int | None = None
    tokens: list[Token] | None = None  # when the request asked for details
    members: list[Member] | None = None  # ensembles


class GenerateResponse(_Model):
    generated_text: str
    details: Details | None = None


class StreamEvent(_Model):
    """One server-sent event: a token; the last one also has generated_text and details."""

    token: Token | None = None
    generated_text: str | None = None
    details: Details | None = None

    @property
    def is_final(self) -> bool:
        return self.generated_text is not None


class TaskRecord(_Model):
    task_id: str
    version: int
    method: str  # prompt_tuning | p_tuning | prefix_tuning
    num_virtual_tokens: int
    bytes: int
    sha256: str
    created_at: datetime


class TaskList(_Model):
    tasks: list[TaskRecord]


class Info(_Model):
    model_id: str
    model_type: str
    dtype: str
    device: str
    hidden_size: int
    num_layers: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_batch_size: int
    max_batch_tokens: int
    max_virtual_tokens: int
    version: str
    num_tasks: int
    kv_cache_tokens: int | None = None  # servers before the KV pool do not say
    kv_block_size: int | None = None
    model_kind: str | None = None  # "causal" or "seq2seq" (servers before it did not say)


class Health(_Model):
    status: str
