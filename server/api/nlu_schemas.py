"""Bodies of POST /v1/classify and /v1/score (docs/api.md, "Classification and scoring")."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from server.api.schemas import TargetTasks, encodable, integral_floats_as_integers
from server.engine.nlu import MAX_CANDIDATES, MAX_INPUTS
from server.engine.types import (
    Classification,
    ClassifyInput,
    EnsembleMode,
    LabelScore,
    ScoreInput,
    Scores,
    TokenLabel,
)

Texts = Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)]
Candidate = Annotated[str, StringConstraints(min_length=1)]


class ClassifyParameters(BaseModel):
    model_config = ConfigDict(strict=True)

    top_k: int | None = Field(default=None, ge=1, description="a sequence task's labels reported (null: every label)")

    @model_validator(mode="before")
    @classmethod
    def _integral_floats_are_integers(cls, data: Any) -> Any:
        return integral_floats_as_integers(cls, data)


class ClassifyRequest(TargetTasks):
    inputs: str | Texts = Field(description=f"one text, or a list of 1 to {MAX_INPUTS} texts")
    ensemble: Literal["mean"] = Field(default="mean", description="task_ids: the members' probabilities averaged")
    parameters: ClassifyParameters = Field(default_factory=lambda: ClassifyParameters())

    @field_validator("inputs", mode="before")
    @classmethod
    def _text_or_texts(cls, value: Any) -> Any:
        """One message for a wrong type, rather than one per member of the union."""
        if not isinstance(value, str | list) or (
            isinstance(value, list) and not all(isinstance(v, str) for v in value)
        ):
            raise ValueError(f"expected a string or a list of strings; found {str(value)[:80]}")
        if isinstance(value, list) and not 1 <= len(value) <= MAX_INPUTS:
            raise ValueError(f"expected 1 to {MAX_INPUTS} inputs; found {len(value)}")
        return value

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, value: str | list[str]) -> str | list[str]:
        for text in [value] if isinstance(value, str) else value:
            encodable(text)
        return value

    def to_engine_input(self) -> ClassifyInput:
        inputs = (self.inputs,) if isinstance(self.inputs, str) else tuple(self.inputs)
        ensemble = EnsembleMode.MEAN if self.task_ids is not None else None
        return ClassifyInput(inputs, self.engine_task_ids, ensemble, self.parameters.top_k)


class LabelScoreOut(BaseModel):
    label: str
    score: float


class TokenLabelOut(BaseModel):
    token: str = Field(description="the input text the token covers")
    start: int = Field(description="character offset of the token's first character in the input")
    end: int = Field(description="character offset just past the token")
    label: str
    score: float


class ClassifyResponse(BaseModel):
    predictions: list[list[LabelScoreOut] | list[TokenLabelOut]] = Field(
        description="one per input, in order: a sequence task's labels by score, highest first; or a token task's "
        "input tokens (special tokens left out), each with its most likely label"
    )

    @classmethod
    def of(cls, result: Classification) -> ClassifyResponse:
        return cls(predictions=[prediction_out(answer) for answer in result.predictions])


def prediction_out(
    answer: tuple[LabelScore, ...] | tuple[TokenLabel, ...],
) -> list[LabelScoreOut] | list[TokenLabelOut]:
    if answer and isinstance(answer[0], TokenLabel):
        return [TokenLabelOut.model_validate(entry, from_attributes=True) for entry in answer]
    return [LabelScoreOut.model_validate(entry, from_attributes=True) for entry in answer]


class ScoreRequest(TargetTasks):
    inputs: str
    candidates: list[Candidate] = Field(min_length=1, max_length=MAX_CANDIDATES)
    ensemble: Literal["mean"] = Field(default="mean", description="task_ids: the members' logprob averaged")

    @field_validator("inputs")
    @classmethod
    def _encodable(cls, value: str) -> str:
        return encodable(value)

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, value: list[str]) -> list[str]:
        for candidate in value:
            encodable(candidate)
        return value

    def to_engine_input(self) -> ScoreInput:
        return ScoreInput(self.inputs, tuple(self.candidates), self.engine_task_ids)


class CandidateScoreOut(BaseModel):
    candidate: str
    logprob: float = Field(description="the sum of the candidate's token log-probabilities after the input")
    mean_logprob: float = Field(description="logprob / num_tokens")
    num_tokens: int


class ScoreResponse(BaseModel):
    scores: list[CandidateScoreOut] = Field(description="in the order of the candidates")
    best: str = Field(description="the candidate with the highest logprob")

    @classmethod
    def of(cls, result: Scores) -> ScoreResponse:
        scores = [
            CandidateScoreOut(candidate=s.candidate, logprob=s.logprob, mean_logprob=s.mean_logprob,
                              num_tokens=s.num_tokens)
            for s in result.scores
        ]  # fmt: skip
        return cls(scores=scores, best=result.best)
