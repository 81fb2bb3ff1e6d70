"""The small surface the HTTP layer sees; tests may hand the app a fake that satisfies it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

from prompt_store.types import TaskRecord
from server.engine.types import (
    Classification,
    ClassifyInput,
    EngineInfo,
    EngineStats,
    GenerateInput,
    PromptScoreInput,
    PromptToken,
    RequestOutput,
    ScoreInput,
    Scores,
    StepStats,
    TokenizerInfo,
)


class EngineClient(Protocol):
    def is_ready(self) -> bool: ...

    def stalled_seconds(self) -> float:
        """How long the engine has had work without completing a step (0 while idle)."""
        ...

    def shutdown(self) -> None:
        """Stop the engine thread; open requests get EngineUnavailable."""
        ...

    def info(self) -> EngineInfo: ...

    def stats(self) -> EngineStats: ...

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        """Called from the engine thread after every step; must be cheap and never raise."""
        ...

    def register_task(
        self, task_id: str, adapter_config: bytes, adapter_model: bytes, labels: bytes | None = None
    ) -> tuple[TaskRecord, bool]:
        """Store a new task or a new version; returns (record, created). Servable when this returns. `labels`: a
        classification task's label names (a JSON array)."""
        ...

    def delete_task(self, task_id: str) -> None: ...

    def list_tasks(self) -> list[TaskRecord]: ...

    def get_task(self, task_id: str) -> TaskRecord: ...

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The backbone's chat template applied to messages ({"role", "content"}), ready for the answer; raises
        NoChatTemplate without a template, InvalidPrompt when the template refuses the messages."""
        ...

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The backbone's token ids for the text (nothing checked against the server's limits)."""
        ...

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of the token ids; raises InvalidPrompt for an id outside the vocabulary."""
        ...

    def tokenizer_info(self) -> TokenizerInfo: ...

    async def prompt_logprobs(self, request: PromptScoreInput) -> tuple[PromptToken | None, ...]:
        """Every prompt token's log-probability after the ones before it (the first: None), its rank and the most
        likely tokens at its position; its request shares the engine's steps with everyone else's.

        Raises TaskNotFound, WrongKind (a classification task, a backbone that is not causal), InvalidPrompt,
        InputTooLong, QueueFull."""
        ...

    async def classify(self, request: ClassifyInput) -> Classification:
        """Every input's prediction under a classification task (or the backbone's own head, or a mean ensemble).

        Raises TaskNotFound, WrongKind (a task of another kind, a backbone without heads), InvalidPrompt,
        InputTooLong, QueueFull."""
        ...

    async def score(self, request: ScoreInput) -> Scores:
        """Every candidate's log-probability after the input, under a generation task (or the bare backbone).

        Raises TaskNotFound, WrongKind (a classification task, an encoder backbone), InvalidPrompt, InputTooLong,
        QueueFull."""
        ...

    def generate(self, request: GenerateInput) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; the last one is finished. Closing the iterator aborts the request.

        Raises TaskNotFound, InvalidPrompt, InputTooLong or QueueFull before the first output."""
        ...
