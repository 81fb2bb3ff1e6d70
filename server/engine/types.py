"""Plain records crossing the engine's boundary: what a caller submits and what it gets back."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

from prompt_store.types import CacheStats, HostCacheStats, TaskKey


class FinishReason(enum.StrEnum):
    LENGTH = "length"
    EOS = "eos_token"
    STOP = "stop_sequence"


class EnsembleMode(enum.StrEnum):
    VOTE = "vote"
    MEAN = "mean"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: plain tokens; k: each token as text and its k most likely alternatives
    ignore_eos: bool = False  # go on past the end-of-sequence token, to max_new_tokens (vLLM's; benchmarks send it)
    min_tokens: int = 0  # the end-of-sequence token cannot be chosen before this many new tokens (vLLM's)
    within_positions: bool = False  # True: new tokens the backbone's positions cannot hold are refused, not capped


@dataclass(frozen=True, slots=True)
class GenerateInput:
    """One generation request. `task_ids` has one entry (None: the bare backbone) or K ensemble members."""

    inputs: str
    task_ids: tuple[str | None, ...] = (None,)
    ensemble: EnsembleMode | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None
    add_special_tokens: bool = True  # False for text that already holds them (a rendered chat template)
    input_ids: tuple[int, ...] | None = None  # the input as token ids instead of text (`inputs` is then unused)
    input_embeds: bytes | None = None  # the input as a torch.save'd [tokens, hidden] tensor (vLLM's prompt_embeds)


@dataclass(frozen=True, slots=True)
class Alternative:
    """One of the most likely tokens at a position, with its text decoded on its own."""

    id: int
    text: str
    logprob: float


@dataclass(frozen=True, slots=True)
class Token:
    id: int
    text: str  # the text this token added to the output (empty while a character is incomplete)
    logprob: float
    top: tuple[Alternative, ...] = ()  # the sampling's top_logprobs most likely tokens, most likely first
    piece: str = ""  # with top_logprobs set: the token as text in context, special tokens shown (as `top` are)


@dataclass(frozen=True, slots=True)
class MemberResult:
    task_id: str | None
    task_version: int | None
    generated_text: str


@dataclass(frozen=True, slots=True)
class Completion:
    """The final result of a request."""

    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    input_tokens: int
    task_id: str | None
    task_version: int | None
    tokens: tuple[Token, ...] = ()
    members: tuple[MemberResult, ...] | None = None  # ensembles only
    queue_seconds: float = 0.0  # from submission to the first scheduling
    virtual_tokens: int = 0  # in front of the request's rows (every member's, for an ensemble)


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """One event of a request's stream: a new token, the final completion (with the last token), or an error."""

    request_id: str
    token: Token | None = None
    completion: Completion | None = None
    error: Exception | None = None

    @property
    def finished(self) -> bool:
        return self.completion is not None or self.error is not None


@dataclass(slots=True)
class RowToken:
    """A token the engine appended to row `row` of a request, and the token-level ending it reached, if any. Not
    frozen, as EngineOutput: one is made for every row every step, and a frozen record takes four times as long to
    make; the engine thread makes it and the caller's loop only reads it."""

    row: int
    id: int
    logprob: float
    finish_reason: FinishReason | None = None  # EOS or LENGTH; stop sequences are found on the text, elsewhere
    top: tuple[tuple[int, float], ...] = ()  # (id, log-probability) of the most likely tokens, when asked for


@dataclass(frozen=True, slots=True)
class PromptToken:
    """A prompt token's log-probability after the tokens before it, its rank (1: the most likely) and the most
    likely tokens at its position."""

    id: int
    text: str
    logprob: float
    rank: int
    top: tuple[Alternative, ...] = ()


@dataclass(frozen=True, slots=True)
class PromptScoreInput:
    """The log-probability of every prompt token after the ones before it, under one task (None: the bare
    backbone), with the `top_logprobs` most likely tokens at each position."""

    token_ids: tuple[int, ...]
    task_id: str | None = None
    top_logprobs: int = 0


@dataclass(frozen=True, slots=True)
class TokenizerInfo:
    """The backbone's tokenizer as vLLM's /tokenizer_info describes it."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None
    model_max_length: int  # positions a request's tokens may take (virtual tokens included)
    vocab_size: int


@dataclass(frozen=True, slots=True)
class RowResult:
    """A classification or scoring row's answer: its head's probabilities (float32, on the CPU: [labels], or
    [input tokens, labels] for a token task), or its candidate tokens' log-probabilities."""

    row: int
    probs: Any = None  # torch.Tensor; typed loosely so this module needs no torch
    logprobs: tuple[float, ...] | None = None
    ranks: tuple[int, ...] | None = None  # a prompt scoring's: each target's rank
    top: tuple[tuple[tuple[int, float], ...], ...] | None = None  # and each position's most likely (id, logprob)


@dataclass(slots=True)
class EngineOutput:
    """What the engine thread reports for a request after a step: token ids only (text is made elsewhere). Not
    frozen: one is made for every request every step (see RowToken); nobody changes it once it is handed over."""

    request_id: str
    tokens: tuple[RowToken, ...] = ()
    finished: bool = False  # the engine has ended every row and dropped the request
    error: Exception | None = None
    results: tuple[RowResult, ...] = ()  # classification and scoring rows computed in full in the step


KindName = Literal["causal", "seq2seq", "encoder"]


@dataclass(frozen=True, slots=True)
class EngineInfo:
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
    # GET /info answers this record as it is; a field's "description" (metadata) is its OpenAPI description
    kv_cache_tokens: int = field(
        default=0, metadata={"description": "the KV pool's capacity in tokens: rows' own and tasks' shared"}
    )
    kv_block_size: int = field(default=0, metadata={"description": "tokens per KV block"})
    max_lora_rank: int = field(default=0, metadata={"description": "the largest LoRA rank a task may have"})
    model_kind: KindName = field(
        default="causal",
        metadata={
            "description": "causal: a decoder-only LM (CAUSAL_LM adapters, and SEQ_CLS on its last token); seq2seq: "
            "an encoder-decoder such as T5 or BART (SEQ_2_SEQ_LM adapters); encoder: BERT, RoBERTa, ELECTRA, "
            "DeBERTa-v2 (SEQ_CLS and TOKEN_CLS adapters), DistilBERT or ALBERT (TOKEN_CLS); /v1/classify only"
        },
    )
    endpoints: tuple[str, ...] = field(
        default=(), metadata={"description": "the routes that apply to this backbone, besides the task routes"}
    )
    has_own_head: bool = field(
        default=False,
        metadata={"description": "the checkpoint has its own classification head: /v1/classify with no task"},
    )


@dataclass(frozen=True, slots=True)
class TaskLoad:
    """A task version put on the device (a cache miss), and how long that took, its device work included."""

    key: TaskKey
    seconds: float


@dataclass(frozen=True, slots=True)
class TaskCacheEvents:
    """What the device task cache did in one step, per task version: users' tasks only (the engine's own probe
    and self-check tasks are left out). Events rather than totals, so the metrics layer bounds the labels."""

    hits: tuple[TaskKey, ...] = ()  # lookups that found the task version on the device
    loads: tuple[TaskLoad, ...] = ()  # lookups that missed and put it there
    evictions: tuple[TaskKey, ...] = ()  # task versions no row held, dropped to make room


@dataclass(frozen=True, slots=True)
class StepStats:
    """What one engine step did, handed to the metrics layer as plain data."""

    batch_size: int
    num_distinct_tasks: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_waiting: int
    step_seconds: float
    cache_events: TaskCacheEvents = TaskCacheEvents()


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_steps: int
    num_tasks: int
    cache: CacheStats
    last_step: StepStats | None = None
    kv_cache_used_bytes: int = 0  # blocks holding rows' or tasks' keys and values
    kv_cache_capacity_bytes: int = 0
    num_preemptions: int = 0
    host_tasks: tuple[TaskKey, ...] = ()  # task versions parsed in CPU memory (the store's LRU); others are on disk
    host_adapters: HostCacheStats = field(default_factory=HostCacheStats)  # its LoRA / IA3 shelf (max_cpu_loras)
    running_tasks: tuple[str, ...] = ()  # the distinct tasks of the running requests' rows (the engine's own left out)
    waiting_tasks: tuple[str, ...] = ()  # and of the waiting requests'


@dataclass(frozen=True, slots=True)
class ClassifyInput:
    """A classification request: each input under one task (or the backbone's own head), or a mean ensemble."""

    inputs: tuple[str, ...]
    task_ids: tuple[str | None, ...] = (None,)
    ensemble: EnsembleMode | None = None
    top_k: int | None = None  # a sequence task's labels reported, most likely first (None: every label)


@dataclass(frozen=True, slots=True)
class LabelScore:
    label: str
    score: float


@dataclass(frozen=True, slots=True)
class TokenLabel:
    token: str  # the input text the token covers
    start: int  # character offsets into the input
    end: int
    label: str
    score: float


@dataclass(frozen=True, slots=True)
class Classification:
    predictions: tuple[tuple[LabelScore, ...] | tuple[TokenLabel, ...], ...]  # one per input, in order
    task_type: str  # SEQ_CLS or TOKEN_CLS
    input_tokens: int  # over every input


@dataclass(frozen=True, slots=True)
class ScoreInput:
    """Rank classification: each candidate's log-probability after the input, under a task or a mean ensemble."""

    inputs: str
    candidates: tuple[str, ...]
    task_ids: tuple[str | None, ...] = (None,)


@dataclass(frozen=True, slots=True)
class CandidateScore:
    candidate: str
    logprob: float  # the sum of its tokens' log-probabilities (an ensemble: the members' mean)
    mean_logprob: float
    num_tokens: int


@dataclass(frozen=True, slots=True)
class Scores:
    scores: tuple[CandidateScore, ...]  # in the order of the candidates
    best: str
    input_tokens: int
