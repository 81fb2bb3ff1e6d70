"""Request and response bodies of docs/api.md, and their conversion to and from the engine's plain records."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import InitErrorDetails, PydanticCustomError

from prompt_store.types import TaskRecord
from server.engine.sampler import MIN_TEMPERATURE
from server.engine.types import (
    Completion,
    EngineInfo,
    EnsembleMode,
    GenerateInput,
    MemberResult,
    SamplingParams,
    Token,
)

TASK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
TaskId = Annotated[str, StringConstraints(pattern=TASK_ID_PATTERN)]
_SAMPLING_DEFAULTS = SamplingParams()
# Every integer up to 2**53 - 1 is exact in a double, so every JSON library and schema validator reads a seed (and
# this bound) as the server does; a torch.Generator would take up to 2**64 - 1.
MAX_SEED = 2**53 - 1
# Sampling colder than the sampler's floor would be greedy in disguise: the API says so instead of guessing.
MIN_SAMPLING_TEMPERATURE = MIN_TEMPERATURE


def _is_none(value: object) -> bool:
    return value is None


def encodable(value: str) -> str:
    """JSON may escape a lone UTF-16 surrogate (\\ud800); no tokenizer can encode one."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"expected valid Unicode text; found a lone surrogate {value[exc.start]!r} at character {exc.start} "
            "(a JSON \\ud800-\\udfff escape that is not half of a pair)"
        ) from None
    return value


def one_of_shapes(expected: str) -> WrapValidator:
    """A union field's refusal as one error, `Input should be <expected>` (the shapes it takes), where pydantic
    would give one per member of the union, each named by its type. An error our own validators raised in a member
    (a `value_error`, which says what was expected and found: a lone surrogate in a string) is kept as it is, its
    place in the value kept and the member's name left out."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as error:
            own: list[InitErrorDetails] = [
                {"type": e["type"], "loc": e["loc"][1:], "input": e["input"], "ctx": e.get("ctx", {})}
                for e in error.errors()
                if e["type"] == "value_error"  # loc[0] is the union member's name
            ]
            if own:
                raise ValidationError.from_exception_data(error.title, own) from None
            raise PydanticCustomError("union_shape", "Input should be {expected}", {"expected": expected}) from None

    return WrapValidator(validate)


def absent_when_none() -> Any:
    """An optional field left out of the JSON (not written as null) when it has no value."""
    return Field(default=None, exclude_if=_is_none)


# ---- requests


def integral_floats_as_integers(model: type[BaseModel], data: Any) -> Any:
    """JSON Schema counts 5.0 as an integer, so the API does too; "5" stays an error (the models are strict)."""
    if not isinstance(data, dict):
        return data
    integers = {name for name, field in model.model_fields.items() if field.annotation in (int, int | None)}
    return {k: int(v) if k in integers and isinstance(v, float) and v.is_integer() else v for k, v in data.items()}


class Parameters(BaseModel):
    """Generation parameters (TGI's names). Null means the default, as TGI clients send nulls for unset fields.
    Strict: "5" is not a number and "yes" not a boolean (a typo should be an error, not a guess)."""

    model_config = ConfigDict(
        strict=True,
        json_schema_extra={  # the temperature rule below, said in the schema too
            "if": {"required": ["do_sample"], "properties": {"do_sample": {"const": True}}},
            "then": {
                "properties": {
                    "temperature": {"anyOf": [{"type": "number", "minimum": MIN_TEMPERATURE}, {"type": "null"}]}
                }
            },
        },
    )

    max_new_tokens: int | None = Field(default=None, ge=1)  # None: the server's default (default_max_new_tokens)
    do_sample: bool = False
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: list[Annotated[str, StringConstraints(min_length=1)]] | None = None
    details: bool = False

    @model_validator(mode="before")
    @classmethod
    def _integral_floats_are_integers(cls, data: Any) -> Any:
        return integral_floats_as_integers(cls, data)

    @field_validator("temperature")
    @classmethod
    def _positive_when_sampling(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and value < MIN_SAMPLING_TEMPERATURE and info.data.get("do_sample"):
            raise ValueError(
                f"expected temperature >= {MIN_SAMPLING_TEMPERATURE} when do_sample is true "
                f"(for greedy decoding set do_sample to false); found {value}"
            )
        return value

    def to_sampling(self, default_max_new_tokens: int) -> SamplingParams:
        # Greedy decoding ignores the temperature; 0 (the usual "greedy" spelling) must not reach the engine.
        temperature = self.temperature if self.temperature else _SAMPLING_DEFAULTS.temperature
        return SamplingParams(
            max_new_tokens=default_max_new_tokens if self.max_new_tokens is None else self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=temperature,
            top_k=_SAMPLING_DEFAULTS.top_k if self.top_k is None else self.top_k,
            top_p=_SAMPLING_DEFAULTS.top_p if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=tuple(self.stop or ()),
        )


ONE_TARGET: dict[str, Any] = {
    "not": {
        "required": ["task_id", "task_ids"],
        "properties": {"task_id": {"type": "string"}, "task_ids": {"type": "array"}},
    }
}


class TargetTasks(BaseModel):
    """task_id (null: the backbone's own) or task_ids (an ensemble), not both."""

    model_config = ConfigDict(strict=True, json_schema_extra=ONE_TARGET)

    task_id: TaskId | None = None
    task_ids: list[TaskId] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_target(self) -> TargetTasks:
        if self.task_id is not None and self.task_ids is not None:
            raise ValueError(
                f"expected either task_id or task_ids, not both; found task_id={self.task_id!r} "
                f"and task_ids={self.task_ids!r}"
            )
        return self

    @property
    def engine_task_ids(self) -> tuple[str | None, ...]:
        return tuple(self.task_ids) if self.task_ids is not None else (self.task_id,)


class GenerateRequest(TargetTasks):
    inputs: str
    ensemble: Literal["vote", "mean"] = "vote"
    parameters: Parameters = Field(default_factory=lambda: Parameters())

    @field_validator("inputs")
    @classmethod
    def _encodable(cls, value: str) -> str:
        return encodable(value)

    def to_engine_input(self, default_max_new_tokens: int) -> GenerateInput:
        sampling = self.parameters.to_sampling(default_max_new_tokens)
        if self.task_ids is not None:
            task_ids, ensemble = tuple(self.task_ids), EnsembleMode(self.ensemble)
            return GenerateInput(inputs=self.inputs, task_ids=task_ids, ensemble=ensemble, sampling=sampling)
        return GenerateInput(inputs=self.inputs, task_ids=(self.task_id,), sampling=sampling)


# ---- responses


class TokenOut(BaseModel):
    id: int
    text: str
    logprob: float

    @classmethod
    def of(cls, token: Token) -> TokenOut:
        return cls(id=token.id, text=token.text, logprob=token.logprob)


class MemberOut(BaseModel):
    task_id: str | None
    task_version: int | None
    generated_text: str

    @classmethod
    def of(cls, member: MemberResult) -> MemberOut:
        return cls(task_id=member.task_id, task_version=member.task_version, generated_text=member.generated_text)


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    input_tokens: int
    task_id: str | None
    task_version: int | None
    tokens: list[TokenOut] | None = absent_when_none()  # only when parameters.details is true
    members: list[MemberOut] | None = absent_when_none()  # ensembles only

    @classmethod
    def of(cls, completion: Completion, with_tokens: bool) -> Details:
        members = completion.members
        return cls(
            finish_reason=completion.finish_reason.value,
            generated_tokens=completion.generated_tokens,
            input_tokens=completion.input_tokens,
            task_id=completion.task_id,
            task_version=completion.task_version,
            tokens=[TokenOut.of(t) for t in completion.tokens] if with_tokens else None,
            members=None if members is None else [MemberOut.of(m) for m in members],
        )


def details_wanted(completion: Completion, with_tokens: bool) -> Details | None:
    """docs/api.md: details when parameters.details is true or the request is an ensemble."""
    if with_tokens or completion.members is not None:
        return Details.of(completion, with_tokens)
    return None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = absent_when_none()

    @classmethod
    def of(cls, completion: Completion, with_tokens: bool) -> GenerateResponse:
        return cls(generated_text=completion.generated_text, details=details_wanted(completion, with_tokens))


class StreamToken(BaseModel):
    id: int
    text: str
    logprob: float  # TGI sends it too

    @classmethod
    def of(cls, token: Token) -> StreamToken:
        return cls(id=token.id, text=token.text, logprob=token.logprob)


class StreamEvent(BaseModel):
    """One server-sent event; the last one carries generated_text and details."""

    token: StreamToken | None
    generated_text: str | None = None
    details: Details | None = None

    @classmethod
    def of_token(cls, token: Token) -> StreamEvent:
        return cls(token=StreamToken.of(token))

    @classmethod
    def final(cls, token: Token | None, completion: Completion, with_tokens: bool) -> StreamEvent:
        return cls(
            token=None if token is None else StreamToken.of(token),
            generated_text=completion.generated_text,
            details=Details.of(completion, with_tokens),
        )


class TaskOut(BaseModel):
    task_id: str
    version: int
    method: Literal["prompt_tuning", "p_tuning", "prefix_tuning", "lora", "ia3"]
    num_virtual_tokens: int = Field(description="the task's virtual tokens (0 for LoRA and IA3)")
    bytes: int
    sha256: str
    created_at: str
    task_type: Literal["CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS"] = Field(
        description="PEFT's task type: generation (CAUSAL_LM, SEQ_2_SEQ_LM) or classification (SEQ_CLS, TOKEN_CLS)"
    )
    labels: list[str] | None = Field(description="a classification task's label names, by class id; else null")
    rank: int | None = Field(description="a LoRA task's rank (the largest of its modules'); else null")

    @classmethod
    def of(cls, record: TaskRecord) -> TaskOut:
        return cls.model_validate(record.to_dict())


class TaskList(BaseModel):
    tasks: list[TaskOut]


@pydantic_dataclass(frozen=True)
class InfoResponse(EngineInfo):
    """GET /info: the engine's own record (server.engine.types.EngineInfo), its fields not copied."""

    @classmethod
    def of(cls, info: EngineInfo) -> InfoResponse:
        return cls(**asdict(info))


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class DeepHealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    checked: str  # what ran through the engine, and how long it took


class ErrorResponse(BaseModel):
    error: str
    error_type: Literal[
        "validation",
        "unauthorized",
        "not_found",
        "method_not_allowed",
        "timeout",
        "conflict",
        "too_large",
        "overloaded",
        "unavailable",
        "internal",
    ]
