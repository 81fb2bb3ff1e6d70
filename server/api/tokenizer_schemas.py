"""The bodies of vLLM's tokenizer routes (/tokenize, /detokenize, /tokenizer_info), in vLLM's shapes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from server.api.openai_schemas import ChatMessage, LenientBody, Text
from server.api.schemas import absent_when_none
from server.engine.types import TokenizerInfo


class TokenizeRequest(LenientBody):
    """vLLM's two forms: a `prompt`, or chat `messages` rendered through the backbone's chat template."""

    model_config = ConfigDict(
        extra="ignore",
        strict=True,
        json_schema_extra={  # exactly one of the two
            "oneOf": [
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}}},
            ]
        },
    )

    model: str | None = Field(default=None, description="a task: max_model_len is what its virtual tokens leave")
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = Field(default=None, description="default: true for prompt, false for messages")
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("expected one of prompt and messages; found " + ("both" if self.prompt else "neither"))
        return self

    @property
    def with_special_tokens(self) -> bool:
        """vLLM's defaults: a prompt gets the tokenizer's special tokens, a rendered template holds its own."""
        return self.add_special_tokens if self.add_special_tokens is not None else self.messages is None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int = Field(description="positions left for a request's tokens (a task's virtual tokens taken)")
    tokens: list[int]
    token_strs: list[str] | None = absent_when_none()


class DetokenizeRequest(LenientBody):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


@pydantic_dataclass(frozen=True)
class TokenizerInfoResponse(TokenizerInfo):
    """What lm-evaluation-harness's remote tokenizer reads (eos/bos/pad tokens, the chat template): the engine's
    own record (server.engine.types.TokenizerInfo), its fields not copied."""
