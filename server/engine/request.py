"""The one request object flowing through the engine: a user's request and its rows in the batch."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prompt_store.types import DeviceTask, TaskArtifact
from server.engine.detokenizer import IncrementalDecoder
from server.engine.types import EnsembleMode, FinishReason, RequestOutput, SamplingParams, Token

OutputSink = Callable[[RequestOutput], None]


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    """One row of the batch: the request's input under one task (or none) and what it generated."""

    request: Request
    task: TaskArtifact | None
    decoder: IncrementalDecoder
    device_task: DeviceTask | None = None  # set while the row holds a prompt-cache reference
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None

    @property
    def num_virtual_tokens(self) -> int:
        return self.task.record.num_virtual_tokens if self.task else 0

    @property
    def is_prefix(self) -> bool:
        """Its virtual tokens enter as per-layer keys and values, not as input embeddings: a prefix task, or (once
        acquired) a prompt task whose virtual tokens' keys and values the prompt cache holds."""
        if self.device_task is not None:
            return bool(self.device_task.prefix_keys)
        return self.task is not None and self.task.record.method.is_prefix

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def task_id(self) -> str | None:
        return self.task.record.task_id if self.task else None

    @property
    def task_version(self) -> int | None:
        return self.task.record.version if self.task else None

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else float("-inf")


@dataclass(eq=False, slots=True)
class Request:
    """What a caller submitted: one row, or K rows for a prompt ensemble."""

    request_id: str
    input_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int  # the caller's, capped by the backbone's position limit
    sink: OutputSink
    ensemble: EnsembleMode | None = None
    rows: list[Sequence] = field(default_factory=list)
    status: Status = Status.WAITING
    generator: torch.Generator | None = None  # seeded sampling; one per request, so batch mates never matter
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None

    @property
    def num_input_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def num_reserved_tokens(self) -> int:
        """KV slots the request may hold at most: its rows' virtual, input and new tokens."""
        return sum(row.num_virtual_tokens + self.num_input_tokens + self.max_new_tokens for row in self.rows)

    @property
    def is_lockstep(self) -> bool:
        return self.ensemble is EnsembleMode.MEAN

    @property
    def is_finished(self) -> bool:
        return all(row.is_finished for row in self.rows)
