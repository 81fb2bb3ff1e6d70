"""Typed responses of the promptserve API (version 1). Unknown fields are ignored, so newer servers still parse."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


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


class LabelScore(_Model):
    """One label of a sequence task's prediction."""

    label: str
    score: float


class TokenLabel(_Model):
    """One input token's label in a token task's prediction; start and end are character offsets into the input."""

    token: str
    start: int
    end: int
    label: str
    score: float


# TokenLabel tried first: a token entry also has every field of a LabelScore, which would parse it minus the token
Prediction = list[Annotated[TokenLabel | LabelScore, Field(union_mode="left_to_right")]]


class ClassifyResponse(_Model):
    """One prediction per input, in order: labels by score (highest first), or one entry per token."""

    predictions: list[Prediction]


class CandidateScore(_Model):
    candidate: str
    logprob: float  # the sum over the candidate's tokens
    mean_logprob: float
    num_tokens: int


class ScoreResponse(_Model):
    """One score per candidate, in the order they were given; `best` is the candidate of the highest logprob."""

    scores: list[CandidateScore]
    best: str


class TaskRecord(_Model):
    task_id: str
    version: int
    method: str  # prompt_tuning | p_tuning | prefix_tuning | lora | ia3
    num_virtual_tokens: int
    bytes: int
    sha256: str
    created_at: datetime
    task_type: str | None = None  # CAUSAL_LM | SEQ_2_SEQ_LM | SEQ_CLS | TOKEN_CLS (servers before NLU did not say)
    labels: list[str] | None = None  # a classification task's label names, class i at index i
    rank: int | None = None  # a LoRA task's rank (servers before LoRA did not say)


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
    max_lora_rank: int | None = None  # servers before LoRA do not say
    model_kind: str | None = None  # causal | seq2seq | encoder (servers before it did not say)
    endpoints: list[str] | None = None  # the routes this model serves, e.g. "/v1/generate"
    has_own_head: bool | None = None  # the checkpoint's own classification head: /v1/classify with no task


class Health(_Model):
    status: str
