"""The bodies of the OpenAI-compatible routes, as vLLM serves them, and their conversion to the engine's records.

Unknown fields are ignored (the openai client and the tools built on it send many); fields OpenAI defines that this
server cannot honour are refused when they ask for something other than their default.
"""

from __future__ import annotations

import logging
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
from pydantic.config import JsonDict

from prompt_store.types import TaskRecord
from server.api.schemas import MAX_SEED, TaskId, absent_when_none, encodable, one_of_shapes
from server.engine.sampler import MAX_TOP_LOGPROBS, MIN_TEMPERATURE
from server.engine.types import Completion, EnsembleMode, FinishReason, PromptToken, SamplingParams, Token

logger = logging.getLogger(__name__)

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions' logprobs
MAX_STOPS, MAX_STOP_CHARS = 16, 1024  # a streamed choice checks its held-back text against each stop per token
OWNER = "promptserve"
Stop = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
Text = Annotated[str, AfterValidator(encodable)]
Stops = Annotated[
    Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)],
    one_of_shapes(f"a string of 1 to {MAX_STOP_CHARS} characters or a list of at most {MAX_STOPS} of them"),
]


def unsupported(value: Any, expected: str) -> ValueError:
    return ValueError(f"expected {expected} (this server does not support it); found {value!r}")


def nulls_are_defaults(data: Any) -> Any:
    """OpenAI's fields are nullable: a null (what clients that serialize None send) means the default."""
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


LOGGED_UNKNOWN: set[tuple[str, str]] = set()  # (body, field) pairs already logged
MAX_LOGGED_UNKNOWN = 256  # names clients make up cannot grow it without bound


def log_unknown_fields(model: type[BaseModel], data: Any) -> Any:
    """Unknown fields are ignored, as vLLM ignores them, but each one's name is logged once per body type: a
    client that counts on a field this server does not know should be visible in the logs."""
    if isinstance(data, dict):
        known = {name for name, info in model.model_fields.items()} | {
            info.alias for info in model.model_fields.values() if info.alias
        }
        for name in data.keys() - known:
            key = (model.__name__, str(name)[:64])
            if key not in LOGGED_UNKNOWN and len(LOGGED_UNKNOWN) < MAX_LOGGED_UNKNOWN:
                LOGGED_UNKNOWN.add(key)
                logger.warning("%s: ignoring the unknown field %r (logged once)", model.__name__, key[1])
    return data


class LenientBody(BaseModel):
    """A request body as vLLM reads one: a null is the field's default, an unknown field is ignored (its name logged
    once)."""

    _nulls = model_validator(mode="before")(nulls_are_defaults)

    @model_validator(mode="before")
    @classmethod
    def _log_unknown(cls, data: Any) -> Any:
        return log_unknown_fields(cls, data)


class StreamOptions(LenientBody):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False  # a last chunk with `usage` and no choices


class SamplingFields(LenientBody):
    """What /v1/completions and /v1/chat/completions share: the model, sampling, ensembles, streaming."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1, description="a task id, `<backbone>:<task>`, or the backbone's id (bare model)")
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False, description="0: greedy")
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=-1, description="vLLM's extension; -1, 0 or null: no top-k filter")
    n: int = Field(default=1, ge=1, description="completions per prompt; n x prompts at most max_waiting")
    stop: Stops | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="choice i of a prompt samples with seed+i")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, not used
    task_ids: list[TaskId] | None = Field(default=None, min_length=1, description="an ensemble (model: the backbone)")
    ensemble: Literal["vote", "mean"] = "vote"
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = Field(default=False, description="vLLM's: go on past end of sequence, to max_tokens")
    min_tokens: int = Field(default=0, ge=0, description="vLLM's: no end of sequence before this many tokens")
    prompt_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS, description="vLLM's: each prompt token's log-probability and the "
        "k most likely tokens at its position (causal backbones)"
    )  # fmt: skip

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs_not_streamed(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("stream"):
            raise unsupported(value, "null when stream is true (as vLLM)")
        return value

    @model_validator(mode="after")
    def _min_tokens_within_max(self) -> SamplingFields:
        maximum = getattr(self, "max_tokens", None)
        if maximum is not None and self.min_tokens > maximum:
            raise ValueError(f"min_tokens: expected at most max_tokens ({maximum}); found {self.min_tokens}")
        return self

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
            ignore_eos=self.ignore_eos,
            min_tokens=min(self.min_tokens, max_new_tokens),
            within_positions=self.names_max_tokens,
        )

    @property
    def scores_prompt(self) -> bool:
        """The prompt's own log-probabilities are computed (an engine request beside the choices')."""
        return self.prompt_logprobs is not None

    @property
    def names_max_tokens(self) -> bool:
        """A request that says how many tokens it wants gets them all or a 400, as OpenAI and vLLM answer."""
        return getattr(self, "max_tokens", None) is not None or getattr(self, "max_completion_tokens", None) is not None

    @property
    def ensemble_mode(self) -> EnsembleMode:
        return EnsembleMode(self.ensemble)


TokenIds = Annotated[list[int], Field(min_length=1)]
PromptIn = str | list[int]  # one prompt: text, or token ids
Prompts = Annotated[
    Text | list[Text] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)],
    one_of_shapes("a string, a list of strings, a list of token ids or a list of lists of token ids (no list empty)"),
]
Embeds = Annotated[
    str | Annotated[list[str], Field(min_length=1)],
    one_of_shapes("a base64 string or a non-empty list of them"),
]


def not_null(name: str) -> JsonDict:
    return {"required": [name], "properties": {name: {"not": {"type": "null"}}}}


COMPLETION_RULES: JsonDict = {  # the cross-field rules below, as JSON Schema says them
    "allOf": [
        {"oneOf": [not_null("prompt"), not_null("prompt_embeds")]},
        {
            "if": {"required": ["max_tokens"], "properties": {"max_tokens": {"const": 0}}},
            "then": {"required": ["echo"], "properties": {"echo": {"const": True}, "stream": {"not": {"const": True}}}},
        },
    ]
}


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=COMPLETION_RULES)

    prompt_embeds: Embeds | None = Field(
        default=None,
        description="vLLM's: base64 of a torch.save'd float tensor [tokens, hidden] (with --enable-prompt-embeds), "
        "or a list of them; instead of prompt",
    )
    prompt: Prompts | None = Field(
        default=None,
        validate_default=True,
        description="a string, a list of strings, token ids, or a list of token-id lists (one choice set per "
        "prompt); token ids are used as they are (no special tokens added)",
    )
    echo: bool = Field(default=False, description="the prompt before the completion (with logprobs: its tokens')")
    max_tokens: int | None = Field(default=None, ge=0, description="null: the server's default; 0: with echo only")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = Field(default=True, description="vLLM's: the tokenizer's special tokens (<s>) added")

    @field_validator("prompt_embeds")
    @classmethod
    def _embeds_have_no_prompt_logprobs(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("prompt_logprobs") is not None:
            raise unsupported(info.data["prompt_logprobs"], "no prompt_logprobs with prompt_embeds (no prompt tokens)")
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shapes(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("expected a string, token ids, or a non-empty list of either; found []")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_or_embeds(cls, value: Any, info: ValidationInfo) -> Any:
        if "prompt_embeds" not in info.data:  # refused: its own error says so
            return value
        has_embeds = info.data.get("prompt_embeds") is not None
        if value is None and not has_embeds:
            raise ValueError("expected a prompt (or prompt_embeds); found none")
        if value is not None and has_embeds:
            raise ValueError("expected a prompt or prompt_embeds, not both; found both")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo_of_embeds(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("prompt_embeds") is not None:
            raise unsupported(value, "false with prompt_embeds (no prompt tokens to echo)")
        return value

    @field_validator("max_tokens")
    @classmethod
    def _zero_only_echoed(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value == 0 and (not info.data.get("echo") or info.data.get("stream")):
            raise ValueError("expected max_tokens >= 1, or 0 with echo: true and no stream; found 0")
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

    @property
    def prompts(self) -> list[PromptIn]:
        """Each prompt: a string, or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt or [])  # type: ignore[arg-type]

    @property
    def embeds(self) -> list[str]:
        return [self.prompt_embeds] if isinstance(self.prompt_embeds, str) else list(self.prompt_embeds or [])

    @property
    def scores_prompt(self) -> bool:
        """The prompts' own log-probabilities are computed: echoed with logprobs, or prompt_logprobs."""
        return (self.echo and self.logprobs is not None) or self.prompt_logprobs is not None

    @property
    def prompt_top(self) -> int:
        """Alternatives per prompt position: the larger of what echo's logprobs and prompt_logprobs ask for."""
        return max(self.logprobs or 0 if self.echo else 0, self.prompt_logprobs or 0)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: Text


Content = Annotated[
    Text | list[TextPart],
    one_of_shapes(
        'a string, null or a list of text parts {"type": "text", "text": <string>} (this server reads text only)'
    ),
]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None
    name: Text | None = None

    def for_template(self) -> dict[str, str]:
        """`developer` is OpenAI's newer name for `system`, which chat templates know."""
        parts = [self.content] if isinstance(self.content, str) else [p.text for p in self.content or []]
        message = {"role": "system" if self.role == "developer" else self.role, "content": "".join(parts)}
        return message | ({"name": self.name} if self.name else {})


class ResponseFormat(BaseModel):
    """OpenAI's response_format: only plain text is served (no JSON mode, no JSON schema)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, description="null: max_completion_tokens, else the default")
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    add_special_tokens: bool = Field(
        default=False, description="vLLM's: special tokens added to the rendered template (it holds its own)"
    )
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None

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
    """Per token; an echoed prompt's tokens first, the first of them with null log-probabilities (as vLLM)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
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

    @classmethod
    def of_prompt(cls, prompt: tuple[PromptToken | None, ...], first: str, top: int, echoed: str) -> CompletionLogprobs:
        """An echoed prompt's tokens (`first`: the first token's text), each with its `top` likeliest; offsets are
        where each token's text starts in the echoed text."""
        texts = [first, *(t.text for t in prompt[1:] if t is not None)]
        offsets = text_offsets(texts, echoed)
        return cls(
            tokens=texts,
            token_logprobs=[None if t is None else t.logprob for t in prompt],
            top_logprobs=[None if t is None else prompt_top_dict(t, top) for t in prompt],
            text_offset=offsets,
        )

    def then(self, other: CompletionLogprobs) -> CompletionLogprobs:
        return CompletionLogprobs(
            tokens=self.tokens + other.tokens,
            token_logprobs=self.token_logprobs + other.token_logprobs,
            top_logprobs=self.top_logprobs + other.top_logprobs,
            text_offset=self.text_offset + other.text_offset,
        )


def text_offsets(pieces: list[str], text: str) -> list[int]:
    """Where each token's piece starts in `text`, read left to right. A piece that is not there (a special token the
    text leaves out, one byte of a multi-byte character shown as U+FFFD) takes the current place; the text a run of
    such bytes makes is skipped when the next piece is found a few characters on."""
    offsets, place = [], 0
    for piece in pieces:
        found = text.find(piece, place, place + len(piece) + 4) if piece and "\ufffd" not in piece else -1
        if found >= 0:
            offsets.append(found)
            place = found + len(piece)
        else:
            offsets.append(place)
    return offsets


def prompt_top_dict(token: PromptToken, top: int) -> dict[str, float]:
    """As top_dict: the `top` likeliest by text, and the prompt token itself when it is not among them."""
    alternatives = token.top[:top]
    out = {alt.text: alt.logprob for alt in reversed(alternatives)}
    if all(alt.id != token.id for alt in alternatives):
        out.setdefault(token.text, token.logprob)
    return out


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry: a token's log-probability at a prompt position, its rank and its text."""

    logprob: float
    rank: int | None
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]


def prompt_logprobs_of(prompt: tuple[PromptToken | None, ...], top: int) -> PromptLogprobs:
    """Per prompt position (the first: null), by token id: the prompt's token and the `top` likeliest."""
    out: PromptLogprobs = []
    for token in prompt:
        if token is None:
            out.append(None)
            continue
        entry = {str(a.id): PromptLogprob(logprob=a.logprob, rank=i + 1, decoded_token=a.text)
                 for i, a in enumerate(token.top[:top])}  # fmt: skip
        entry[str(token.id)] = PromptLogprob(logprob=token.logprob, rank=token.rank, decoded_token=token.text)
        out.append(entry)
    return out


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
    prompt_logprobs: PromptLogprobs | None = absent_when_none()


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
    prompt_logprobs: PromptLogprobs | None = absent_when_none()


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
    method: Literal["prompt_tuning", "p_tuning", "prefix_tuning", "lora", "ia3"] | None
    num_virtual_tokens: int | None
    rank: int | None = Field(default=None, description="a LoRA task's rank; null for other tasks and the backbone")

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
            rank=record.rank,
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
