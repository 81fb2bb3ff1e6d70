"""The one request object flowing through the engine: a user's request and its rows in the batch."""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prompt_store.types import TaskArtifact
from server.engine.kinds.base import ModelKind
from server.engine.kinds.causal import Causal
from server.engine.kv_memory import TaskBlocks
from server.engine.types import EngineOutput, EnsembleMode, FinishReason, SamplingParams

OutputSink = Callable[[EngineOutput], None]  # called on the engine thread
RankedTarget = tuple[int, tuple[tuple[int, float], ...]]  # a scored token's rank and the most likely (id, logprob)


class TokenSink:
    """An output sink that also takes a one-row request's new token as plain values, so that the engine thread
    makes no objects for the most common output of a step (the async engine's: the output is made on the caller's
    loop, see async_engine.Outbox). Called on the engine thread; raises if the caller cannot be reached. Not an ABC:
    the engine asks every token's sink whether it is one, and an ABC answers through a Python call."""

    __slots__ = ()

    def __call__(self, output: EngineOutput) -> None:
        raise NotImplementedError

    def put_token(
        self, request_id: str, row: int, token_id: int, logprob: float, finish_reason: FinishReason | None,
        top: tuple[tuple[int, float], ...],
    ) -> None:  # fmt: skip
        """The output EngineOutput(request_id, (RowToken(row, token_id, logprob, finish_reason, top),), finished)
        with `finished` whether the row ended (the request's only row)."""
        raise NotImplementedError


class Job(enum.Enum):
    """What a request asks of its rows: new tokens, a classification head's probabilities, or the log-probability
    of given tokens (a candidate answer, scored after the input)."""

    GENERATE = "generate"
    CLASSIFY = "classify"
    SCORE = "score"


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    """One row of the batch: the request's input under one task (or none) and the token ids it generated.

    A row's own tokens are those with keys and values in its blocks, laid out by its backbone's kind (a causal
    row's: its embedded virtual tokens, a prompt task fed as input embeddings, its input and its output so far);
    `num_computed` of them are computed. A row whose task enters as keys and values (`has_kv_prefix`) attends to
    the task's shared blocks first, and its own tokens' positions continue after them.
    """

    request: Request
    task: TaskArtifact | None
    index: int = 0  # among the request's rows
    has_kv_prefix: bool = False  # the task's virtual tokens enter as its shared keys and values, not as embeddings
    task_blocks: TaskBlocks | None = None  # held while running, when has_kv_prefix
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    targets: list[int] = field(default_factory=list)  # SCORE: the candidate's tokens, each scored after the ones before
    target_logprobs: list[float] = field(default_factory=list)  # SCORE: filled as the row's chunks are computed
    target_ranks: list[RankedTarget] = field(default_factory=list)  # SCORE of a prompt: with ranks and alternatives
    probs: torch.Tensor | None = None  # CLASSIFY: [labels], or [input tokens, labels] for a token task
    done: bool = False  # a CLASSIFY or SCORE row whose every token has been computed
    probe_vector: torch.Tensor | None = None  # a probe's row: its first logits [V], or its head's last input [H]
    holds_adapter: bool = False  # a LoRA / IA3 row admitted: it holds its task's weights in the adapter pool
    # Counts fixed when the row is made (its task, input, candidate and kind never change), kept because every step
    # reads them for every row (the kind's methods define them):
    num_embedded_tokens: int = field(init=False, default=0)  # virtual tokens fed as input embeddings (not as KV)
    num_prefix_tokens: int = field(init=False, default=0)  # positions before the own tokens: the task's shared KV
    encoder_length: int = field(init=False, default=0)  # what an encoder pass computes when the row starts
    num_fixed_tokens: int = field(init=False, default=0)  # own tokens but the output: own = fixed + len(output_ids)

    def __post_init__(self) -> None:
        kind = self.request.kind
        self.num_embedded_tokens = kind.num_embedded_tokens(self)
        self.num_prefix_tokens = self.num_virtual_tokens if self.has_kv_prefix else 0
        self.encoder_length = kind.encoder_length(self)
        self.num_fixed_tokens = kind.num_own_tokens(self) - len(self.output_ids)

    @property
    def fed_targets(self) -> list[int]:
        """A scored candidate's tokens fed after the input: all but the last (no position reads its logits)."""
        return self.targets[:-1]

    @property
    def num_fed_targets(self) -> int:
        """How many `fed_targets` there are, without copying them (the scheduler asks every row each step)."""
        return max(len(self.targets) - 1, 0)

    @property
    def scored_from(self) -> int:
        """The own token whose logits give the first target's log-probability (the input's last; an
        encoder-decoder's decoder start token); target j's are those of the token j after it."""
        return self.request.kind.scored_from(self)

    @property
    def num_virtual_tokens(self) -> int:
        return self.task.record.num_virtual_tokens if self.task else 0

    @property
    def applies_adapter(self) -> bool:
        """A LoRA or IA3 task's row: its tokens take the task's deltas in the backbone's modules."""
        return self.task is not None and not self.task.record.method.is_prompt_learning

    @property
    def num_own_tokens(self) -> int:
        """Tokens with keys and values in the row's own blocks: a causal row's virtual, input and output tokens;
        an encoder-decoder row's decoder tokens (the start token and the output)."""
        return self.num_fixed_tokens + len(self.output_ids)

    @property
    def num_remaining(self) -> int:
        """Own tokens still to compute before the row can be sampled."""
        return self.num_fixed_tokens + len(self.output_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None or self.done

    @property
    def needs_task_blocks(self) -> bool:
        """It will attend to its task's shared keys and values (a finished row, resumed with its request, won't)."""
        return self.has_kv_prefix and self.task is not None and not self.is_finished

    @property
    def task_id(self) -> str | None:
        return self.task.record.task_id if self.task else None

    @property
    def task_version(self) -> int | None:
        return self.task.record.version if self.task else None


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
    generators: tuple[random.Random, ...] = ()  # a seeded request's draws, one a row (see intake.make_generators)
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    jumps_queue: bool = False  # the engine's own (a new task's probe): first in line, outside the batch-size limit
    kind: ModelKind = field(default_factory=Causal)  # the backbone's: it lays out the rows' own tokens
    job: Job = Job.GENERATE
    head_type: str | None = None  # CLASSIFY: SEQ_CLS or TOKEN_CLS, the task type of its rows' heads
    keeps_probe_vectors: bool = False  # a new task's probe: its rows keep what the probe judges (see probe.py)
    input_embeds: torch.Tensor | None = None  # [T, H] on the device: the input given as embeddings (ids: padding)

    @property
    def num_input_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def is_lockstep(self) -> bool:
        return self.ensemble is EnsembleMode.MEAN

    @property
    def is_finished(self) -> bool:
        return all(row.is_finished for row in self.rows)

    @property
    def computes_rows_whole(self) -> bool:
        """Each row is computed in one step, its tokens seeing each other (an encoder's)."""
        return self.kind.computes_rows_whole

    @property
    def encoder_tokens(self) -> int:
        """What encoder passes compute when its rows start (an encoder-decoder's; 0 for any other request)."""
        return sum(row.encoder_length for row in self.rows if not row.is_finished)

    @property
    def whole_tokens(self) -> int:
        """What must all run in the step that starts the request: encoder passes, and rows computed whole."""
        rows = sum(row.num_remaining for row in self.rows if not row.is_finished) if self.computes_rows_whole else 0
        return self.encoder_tokens + rows

    def max_own_tokens(self, row: Sequence) -> int:
        """The most slots a row of this request can need: embedded virtual, input and every new token (an
        encoder-decoder row: its encoder input, or its decoder tokens, whichever is longer)."""
        return self.kind.max_own_tokens(row, self.max_new_tokens)

    def adapter_keys(self) -> set[tuple[str, int]]:
        """The distinct LoRA and IA3 tasks the unfinished rows apply."""
        return {row.task.key for row in self.rows if row.applies_adapter and row.task and not row.is_finished}

    def task_tokens(self) -> dict[tuple[str, int], int]:
        """The distinct tasks whose shared keys and values the unfinished rows need: key -> virtual tokens."""
        return {row.task.key: row.num_virtual_tokens for row in self.rows if row.needs_task_blocks and row.task}
