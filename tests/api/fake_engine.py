"""A stand-in for the real engine that satisfies EngineClient faithfully, for tests of the HTTP layer.

Like the real one it streams one output per token and then a separate completion (a vote ensemble streams
nothing before its answer), raises typed errors on the first `anext`, and treats closing its iterator before
the completion as an abort, which it records. Each character of a deterministic answer is one token.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prompt_store.types import CacheStats, Method, TaskRecord
from server import __version__
from server.engine.errors import (
    EngineUnavailable,
    InputTooLong,
    InvalidPrompt,
    InvalidTask,
    NoChatTemplate,
    QueueFull,
    TaskNotFound,
    TaskTooLarge,
    UnknownToken,
)
from server.engine.types import (
    CandidateScore,
    Classification,
    ClassifyInput,
    Completion,
    EngineInfo,
    EngineStats,
    EnsembleMode,
    FinishReason,
    GenerateInput,
    LabelScore,
    MemberResult,
    PromptScoreInput,
    PromptToken,
    RequestOutput,
    ScoreInput,
    Scores,
    StepStats,
    TaskCacheEvents,
    TaskLoad,
    Token,
    TokenizerInfo,
)

EOS_ID, BOS_ID = 0, 257
VOCAB_SIZE, MAX_MODEL_LEN = 259, 1024
LOGPROB = -0.5
PEFT_METHODS = {
    "PROMPT_TUNING": Method.PROMPT_TUNING,
    "P_TUNING": Method.P_TUNING,
    "PREFIX_TUNING": Method.PREFIX_TUNING,
}


def check_ids(token_ids: list[int] | tuple[int, ...], what: str) -> None:
    """As the engine's intake: an id the model has no row for is UnknownToken, naming it."""
    unknown = [token_id for token_id in token_ids if not 0 <= token_id < VOCAB_SIZE]
    if unknown:
        raise UnknownToken(f"{what}: expected token ids below {VOCAB_SIZE}; found token {unknown[0]}")


def answer_of(task_id: str | None, inputs: str) -> str:
    """What a task "generates": its id and the reversed input, so every task answers differently."""
    return f"{task_id or 'bare'}:{inputs[::-1]}"


def adapter_config(method: str = "PROMPT_TUNING", num_virtual_tokens: int = 4) -> bytes:
    return json.dumps(
        {"peft_type": method, "task_type": "CAUSAL_LM", "num_virtual_tokens": num_virtual_tokens}
    ).encode()


@dataclass(frozen=True)
class Row:
    task_id: str | None
    tokens: list[Token]
    text: str
    finish_reason: FinishReason


@dataclass
class FakeEngine:
    ready: bool = True
    token_delay_s: float = 0.0
    hold: bool = False  # while true, requests wait before their first token (to test disconnects)
    queue_full: bool = False
    crash_with: Exception | None = None  # raised on the first output: an unexpected engine failure
    fail_after_tokens: int | None = None  # an engine error in the middle of a stream
    max_input_chars: int = 200
    max_new_tokens_limit: int = 512
    max_adapter_bytes: int = 10_000
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    requests: list[GenerateInput] = field(default_factory=list)
    listeners: list[Callable[[StepStats], None]] = field(default_factory=list)
    num_steps: int = 0
    num_shutdowns: int = 0
    ids: itertools.count = field(default_factory=itertools.count)
    on_device: set[str] = field(default_factory=set)  # tasks a request has "loaded"; never evicted
    has_chat_template: bool = False
    stalled_s: float = 0.0  # what stalled_seconds reports

    # ---- EngineClient: service

    def is_ready(self) -> bool:
        return self.ready

    def stalled_seconds(self) -> float:
        return self.stalled_s

    def shutdown(self) -> None:
        self.ready = False
        self.num_shutdowns += 1

    def info(self) -> EngineInfo:
        return EngineInfo(
            model_id="fake/tiny", model_type="llama", dtype="float32", device="cpu", hidden_size=48, num_layers=2,
            num_key_value_heads=2, head_dim=8, vocab_size=VOCAB_SIZE, max_batch_size=8, max_batch_tokens=1024,
            max_virtual_tokens=64, version=__version__, num_tasks=len(self.tasks), kv_cache_tokens=4096,
            kv_block_size=8,
            endpoints=("/v1/generate", "/v1/generate_stream", "/v1/completions", "/v1/chat/completions", "/v1/score",
                       "/v1/classify"),
        )  # fmt: skip

    def stats(self) -> EngineStats:
        running = len(self.started) - len(self.completed) - len(self.aborted)
        device = tuple(sorted(self.tasks[t].key for t in self.on_device if t in self.tasks))
        cache = CacheStats(hits=7, misses=2, evictions=1, resident_bytes=4096, num_entries=2, num_pinned=0,
                           resident_tasks=device)  # fmt: skip
        return EngineStats(num_running=running, num_waiting=0, num_steps=self.num_steps, num_tasks=len(self.tasks),
                           cache=cache, host_tasks=tuple(sorted(r.key for r in self.tasks.values())))  # fmt: skip

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        self.listeners.append(listener)

    # ---- EngineClient: tasks

    def register_task(
        self, task_id: str, adapter_config: bytes, adapter_model: bytes, labels: bytes | None = None
    ) -> tuple[TaskRecord, bool]:
        method, num_virtual_tokens = parse_config(adapter_config)
        if len(adapter_model) > self.max_adapter_bytes:
            raise TaskTooLarge(
                f"expected an adapter of at most {self.max_adapter_bytes} bytes; found {len(adapter_model)}"
            )
        previous = self.tasks.get(task_id)
        record = TaskRecord(
            task_id=task_id, version=previous.version + 1 if previous else 1, method=method,
            num_virtual_tokens=num_virtual_tokens, bytes=len(adapter_config) + len(adapter_model),
            sha256=hashlib.sha256(adapter_model).hexdigest(),
            created_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            labels=tuple(json.loads(labels)) if labels is not None else None,
        )  # fmt: skip
        self.tasks[task_id] = record
        return record, previous is None

    def add_task(self, task_id: str) -> TaskRecord:
        return self.register_task(task_id, adapter_config(), b"weights")[0]

    def delete_task(self, task_id: str) -> None:
        if self.tasks.pop(task_id, None) is None:
            raise TaskNotFound(task_id)

    def list_tasks(self) -> list[TaskRecord]:
        return sorted(self.tasks.values(), key=lambda record: record.task_id)

    def get_task(self, task_id: str) -> TaskRecord:
        if task_id not in self.tasks:
            raise TaskNotFound(task_id)
        return self.tasks[task_id]

    # ---- EngineClient: classification and scoring (every task here is a two-label classifier and a generator)

    async def classify(self, request: ClassifyInput) -> Classification:
        self.check_tasks(request.task_ids)
        predictions = []
        for text in request.inputs:
            positive = (len(text) % 4 + 1) / 5  # deterministic, different per input length
            labels = (LabelScore("positive", positive), LabelScore("negative", 1 - positive))
            predictions.append(tuple(sorted(labels, key=lambda entry: -entry.score))[: request.top_k])
        return Classification(tuple(predictions), "SEQ_CLS", sum(len(text) for text in request.inputs))

    async def score(self, request: ScoreInput) -> Scores:
        self.check_tasks(request.task_ids)
        scores = tuple(
            CandidateScore(candidate, LOGPROB * len(candidate), LOGPROB, len(candidate))
            for candidate in request.candidates
        )
        return Scores(scores, max(scores, key=lambda s: s.logprob).candidate, len(request.inputs))

    def check_tasks(self, task_ids: tuple[str | None, ...]) -> None:
        if not self.ready:
            raise EngineUnavailable("the engine is not running")
        for task_id in task_ids:
            if task_id is not None and task_id not in self.tasks:
                raise TaskNotFound(task_id)
        if self.queue_full:
            raise QueueFull(num_waiting=3, retry_after=2.5)

    # ---- EngineClient: the tokenizer (each character one token: its code point, as a byte tokenizer's)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [*([BOS_ID] if add_special_tokens else []), *(min(ord(c), 255) for c in text)]

    def detokenize(self, token_ids: list[int]) -> str:
        check_ids(token_ids, "tokens")
        return "".join(chr(i) for i in token_ids if i < 256)

    def tokenizer_info(self) -> TokenizerInfo:
        return TokenizerInfo("FakeTokenizer", "<s>", "</s>", None, None, None, MAX_MODEL_LEN, VOCAB_SIZE)

    async def prompt_logprobs(self, request: PromptScoreInput) -> tuple[PromptToken | None, ...]:
        self.check_tasks((request.task_id,))
        check_ids(request.token_ids, "prompt")
        return (None, *(PromptToken(i, chr(i), LOGPROB, 1) for i in request.token_ids[1:]))

    # ---- EngineClient: generation

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if not self.has_chat_template:
            raise NoChatTemplate("expected a backbone whose tokenizer has a chat template; found none")
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"

    async def generate(self, request: GenerateInput) -> AsyncIterator[RequestOutput]:
        self.check(request)
        request_id = f"req-{next(self.ids)}"
        self.requests.append(request)
        self.started.append(request_id)
        finished = False
        try:
            while self.hold:
                await asyncio.sleep(0.005)
            if self.crash_with is not None:
                raise self.crash_with
            rows = [self.decode(request, task_id) for task_id in request.task_ids]
            answer_row = pick_answer(rows, request.ensemble)
            if request.ensemble is not EnsembleMode.VOTE:
                for i, token in enumerate(answer_row.tokens):
                    await self.step(request, i)
                    yield RequestOutput(request_id, token=token)
            finished = True
            yield RequestOutput(request_id, completion=self.completion(request, rows, answer_row))
        finally:
            (self.completed if finished else self.aborted).append(request_id)

    def check(self, request: GenerateInput) -> None:
        if not self.ready:
            raise EngineUnavailable("the engine is not running")
        if request.sampling.max_new_tokens > self.max_new_tokens_limit:
            raise InvalidPrompt(f"expected max_new_tokens in [1, {self.max_new_tokens_limit}]; "
                                f"found {request.sampling.max_new_tokens}")  # fmt: skip
        for task_id in request.task_ids:
            if task_id is not None and task_id not in self.tasks:
                raise TaskNotFound(task_id)
        if len(request.inputs) > self.max_input_chars:
            raise InputTooLong(f"expected at most {self.max_input_chars} input tokens; found {len(request.inputs)}")
        if self.queue_full:
            raise QueueFull(num_waiting=3, retry_after=2.5)

    async def step(self, request: GenerateInput, index: int) -> None:
        if self.fail_after_tokens is not None and index >= self.fail_after_tokens:
            raise EngineUnavailable("the engine step failed: simulated")
        await asyncio.sleep(self.token_delay_s)
        self.num_steps += 1
        stats = StepStats(batch_size=len(request.task_ids), num_distinct_tasks=len(set(request.task_ids) - {None}),
                          num_prefill_tokens=0, num_decode_tokens=1, num_waiting=0, step_seconds=0.001,
                          cache_events=self.cache_events(request) if index == 0 else TaskCacheEvents())  # fmt: skip
        for listener in self.listeners:
            listener(stats)

    def cache_events(self, request: GenerateInput) -> TaskCacheEvents:
        """As the real engine's first step of a request: each member row's task is a hit, or a load the first time."""
        hits, loads = [], []
        for key in [self.tasks[task_id].key for task_id in request.task_ids if task_id is not None]:
            if key[0] in self.on_device:
                hits.append(key)
            else:
                loads.append(TaskLoad(key, 0.002))
                self.on_device.add(key[0])
        return TaskCacheEvents(hits=tuple(hits), loads=tuple(loads))

    def decode(self, request: GenerateInput, task_id: str | None) -> Row:
        text = answer_of(task_id, request.inputs)
        limit = request.sampling.max_new_tokens
        tokens = [Token(ord(char), char, LOGPROB) for char in text[:limit]]
        if len(text) >= limit:
            return Row(task_id, tokens, text[:limit], FinishReason.LENGTH)
        return Row(task_id, [*tokens, Token(EOS_ID, "", LOGPROB)], text, FinishReason.EOS)

    def completion(self, request: GenerateInput, rows: list[Row], answer: Row) -> Completion:
        members = None
        if request.ensemble is not None:
            members = tuple(MemberResult(row.task_id, self.version_of(row.task_id), row.text) for row in rows)
        task_id = None if request.ensemble is EnsembleMode.MEAN else answer.task_id
        return Completion(
            generated_text=answer.text,
            finish_reason=answer.finish_reason,
            generated_tokens=len(answer.tokens),
            input_tokens=len(request.inputs) + 1,
            task_id=task_id,
            task_version=self.version_of(task_id),
            tokens=tuple(answer.tokens),
            members=members,
        )

    def version_of(self, task_id: str | None) -> int | None:
        return self.tasks[task_id].version if task_id is not None else None


def pick_answer(rows: list[Row], ensemble: EnsembleMode | None) -> Row:
    if ensemble is EnsembleMode.VOTE:
        counts = Counter(row.text for row in rows)
        return max(rows, key=lambda row: counts[row.text])
    return rows[0]


def parse_config(adapter_config: bytes) -> tuple[Method, int]:
    try:
        config = json.loads(adapter_config)
        method = PEFT_METHODS[config["peft_type"]]
        return method, int(config["num_virtual_tokens"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidTask(
            f"expected a PEFT prompt-learning adapter_config.json; found {adapter_config[:40]!r} ({exc!r})"
        ) from exc
