"""The bodies of the OpenAI-compatible routes, as vLLM serves them, and their conversion to the engine's records.

Unknown fields are ignored (the openai client and the tools built on it send many); fields OpenAI defines that this
server cannot honour are refused when they ask for something other than their default.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from prompt_store.types import TaskRecord
from server.api.schemas import MAX_SEED, TaskId, absent_when_none, encodable
from server.engine.sampler import MAX_TOP_LOGPROBS, MIN_TEMPERATURE
from server.engine.types import Completion, EnsembleMode, FinishReason, SamplingParams, Token

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions' logprobs
MAX_STOPS, MAX_STOP_CHARS = 16, 1024  # a streamed choice checks its held-back text against each stop per token
OWNER = "promptserve"
Stop = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
Text = Annotated[str, AfterValidator(encodable)]


def unsupported(value: Any, expected: str) -> ValueError:
    return ValueError(f"expected {expected} (this server does not support it); found {value!r}")


def nulls_are_defaults(data: Any) -> Any:
    """OpenAI's fields are nullable: a null (what clients that serialize None send) means the default."""
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False  # a last chunk with `usage` and no choices

    _nulls = model_validator(mode="before")(nulls_are_defaults)


class SamplingFields(BaseModel):
    """What /v1/completions and /v1/chat/completions share: the model, sampling, ensembles, streaming."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1, description="a task id, `<backbone>:<task>`, or the backbone's id (bare model)")
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False, description="0: greedy")
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=-1, description="vLLM's extension; -1, 0 or null: no top-k filter")
    n: int = Field(default=1, ge=1, description="completions per prompt; n x prompts is at most the batch size")
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="choice i of a prompt samples with seed+i")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, not used
    task_ids: list[TaskId] | None = Field(default=None, min_length=1, description="an ensemble (model: the backbone)")
    ensemble: Literal["vote", "mean"] = "vote"
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    _nulls = model_validator(mode="before")(nulls_are_defaults)

    @field_validator("stream_options")
    @classmethod
    def _only_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("expected stream_options only with stream: true; found it without")
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value not in (None, 0):
            raise unsupported(value, "0 or null")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise unsupported(value, "null or {}")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, max_new_tokens: int, choice: int, top_logprobs: int | None) -> SamplingParams:
        """OpenAI's defaults: temperature 1 samples; 0 (or below the sampler's floor) is greedy."""
        temperature = 1.0 if self.temperature is None else self.temperature
        do_sample = temperature >= MIN_TEMPERATURE
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else 1.0,
            top_k=max(self.top_k or 0, 0),
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=None if self.seed is None else (self.seed + choice) % (MAX_SEED + 1),
            stop=stop,
            top_logprobs=top_logprobs,
        )

    @property
    def ensemble_mode(self) -> EnsembleMode:
        return EnsembleMode(self.ensemble)


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] = Field(description="a string, or a list of strings (one choice set per prompt)")
    max_tokens: int | None = Field(default=None, ge=1, description="null: the server's default")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, value: Any) -> Any:
        """Token-id prompts are OpenAI's too, but a task's tokenizer decides what ids mean: say so plainly."""
        if isinstance(value, list) and not value:
            raise ValueError("expected a string or a non-empty list of strings; found []")
        if isinstance(value, list) and not all(isinstance(p, str) for p in value):
            raise unsupported(value[:4], "a string or a list of strings (token ids are not accepted)")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if value not in (None, n):
            raise unsupported(value, f"null or n ({n})")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise unsupported(value, "null")
        return value

    @field_validator("echo")
    @classmethod
    def _echo_without_logprobs(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("logprobs") is not None:
            raise unsupported(value, "false when logprobs is set (the prompt's own log-probabilities are not computed)")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def for_template(self) -> dict[str, str]:
        """`developer` is OpenAI's newer name for `system`, which chat templates know."""
        parts = [self.content] if isinstance(self.content, str) else [p.text for p in self.content or []]
        message = {"role": "system" if self.role == "developer" else self.role, "content": "".join(parts)}
        return message | ({"name": self.name} if self.name else {})


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="null: max_completion_tokens, else the default")
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError(f"expected logprobs: true with top_logprobs; found top_logprobs={value} without it")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise unsupported(f"{len(value)} tool(s)", "none")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        if value not in (None, "none"):
            raise unsupported(value, 'null or "none"')
        return value

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value not in (None, {"type": "text"}):
            raise unsupported(value, 'null or {"type": "text"}')
        return value

    @property
    def num_top_logprobs(self) -> int | None:
        """None: no log-probabilities; 0: the chosen token's; k: and the k most likely."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def max_tokens_field(self) -> tuple[int | None, str]:
        """max_completion_tokens (OpenAI's newer name) wins over max_tokens, as OpenAI and vLLM read them."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


# ---- responses


def finish_reason(completion: Completion) -> Literal["stop", "length"]:
    return "length" if completion.finish_reason is FinishReason.LENGTH else "stop"


class PromptTokensDetails(BaseModel):
    virtual_tokens: int = Field(description="the tasks' virtual tokens in front of the prompts (not in prompt_tokens)")


class Usage(BaseModel):
    """`prompt_tokens` counts the prompts' tokens once per prompt (not per choice), virtual tokens not included;
    `completion_tokens` every choice's tokens (an ensemble's: its answer's)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, per_prompt: list[Completion], every_choice: list[Completion]) -> Usage:
        prompt = sum(c.input_tokens for c in per_prompt)
        completion = sum(c.generated_tokens for c in every_choice)
        virtual = sum(c.virtual_tokens for c in per_prompt)
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(virtual_tokens=virtual))  # fmt: skip


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]

    @classmethod
    def of(cls, tokens: list[Token], start: int) -> CompletionLogprobs:
        offsets = []
        for token in tokens:
            offsets.append(start)
            start += len(token.text)
        return cls(
            tokens=[t.piece for t in tokens],
            token_logprobs=[t.logprob for t in tokens],
            top_logprobs=[top_dict(t) for t in tokens],
            text_offset=offsets,
        )


def top_dict(token: Token) -> dict[str, float]:
    """The alternatives by text (OpenAI's form; tokens with the same text keep the likelier), and the chosen token
    when it is not among them (OpenAI's "up to logprobs + 1")."""
    top = {alt.text: alt.logprob for alt in reversed(token.top)}
    if all(alt.id != token.id for alt in token.top):
        top.setdefault(token.piece, token.logprob)
    return top


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]

    @classmethod
    def of(cls, token: Token) -> TokenLogprob:
        top = [TopLogprob(token=a.text, logprob=a.logprob, bytes=list(a.text.encode())) for a in token.top]
        return cls(token=token.piece, logprob=token.logprob, bytes=list(token.piece.encode()), top_logprobs=top)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]

    @classmethod
    def of(cls, tokens: list[Token]) -> ChatLogprobs:
        return cls(content=[TokenLogprob.of(t) for t in tokens])


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = absent_when_none()
    content: str | None = absent_when_none()


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """A servable model: the backbone, or a task on it (vLLM's `root`/`parent`, plus the task's record)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = OWNER
    root: str
    parent: str | None
    version: int | None = Field(description="the task's current version; null for the backbone")
    method: Literal["prompt_tuning", "p_tuning", "prefix_tuning"] | None
    num_virtual_tokens: int | None

    @classmethod
    def backbone(cls, name: str, created: int) -> ModelCard:
        return cls(id=name, created=created, root=name, parent=None, version=None, method=None, num_virtual_tokens=None)

    @classmethod
    def task(cls, record: TaskRecord, backbone: str) -> ModelCard:
        return cls(
            id=record.task_id,
            created=rfc3339_seconds(record.created_at),
            root=backbone,
            parent=backbone,
            version=record.version,
            method=record.method.value,
            num_virtual_tokens=record.num_virtual_tokens,
        )


def rfc3339_seconds(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp())


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail
