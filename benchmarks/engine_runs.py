"""Drives the synchronous engine core over a workload, continuously or in static batches, and times it.

Requests are built (tokenized, task resolved) before the clock starts: in the server that work happens in the
callers' threads, not the engine's. Arrivals are honoured in wall-clock time. On an encoder backbone `classify`
runs a workload as classification requests (one input each), all queued at once.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.workload import InputsTimed, TaskSpec, Workload
from prompt_store.adapter import StoreLimits
from prompt_store.registry import TaskStore
from server.engine.backbone import Backbone, load_backbone
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.intake import IntakeConfig, build_request
from server.engine.nlu import Results, plan_classify
from server.engine.request import Request
from server.engine.types import ClassifyInput, EngineOutput, GenerateInput, SamplingParams, StepStats

CONTINUOUS, STATIC = "continuous", "static"
INTAKE = IntakeConfig(max_input_tokens=4096, max_new_tokens=4096)


@dataclass(slots=True)
class RunResult:
    seconds: float
    cpu_seconds: float  # this process's CPU time: robust to other processes' load when torch uses one thread
    num_new_tokens: int
    token_ids: list[list[int]]  # per job, in workload order
    ttft_s: list[float]  # per job: arrival to first token
    latency_s: list[float]  # per job: arrival to last token
    steps: StepTotals

    @property
    def tokens_per_s(self) -> float:
        return self.num_new_tokens / self.seconds

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.num_new_tokens / self.cpu_seconds


@dataclass(slots=True)
class ClassifyRun(InputsTimed):
    probs: list[torch.Tensor]  # per job, in workload order: [labels]
    steps: StepTotals


@dataclass(slots=True)
class StepTotals:
    """Engine steps of one run, from the engine's own StepStats: prefill steps admit rows, decode steps grow them."""

    num_prefill_steps: int = 0
    num_decode_steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    num_prefill_tokens: int = 0  # virtual (prompt rows) + input tokens, without padding

    def add(self, stats: StepStats) -> None:
        if stats.num_prefill_tokens:
            self.num_prefill_steps += 1
            self.prefill_s += stats.step_seconds
            self.num_prefill_tokens += stats.num_prefill_tokens
        else:
            self.num_decode_steps += 1
            self.decode_s += stats.step_seconds


@dataclass
class EngineRig:
    """One backbone, store and engine, reused across runs (as a server would); built as the server builds it."""

    backbone: Backbone
    store: TaskStore
    engine: Engine
    steps: StepTotals = field(default_factory=StepTotals)

    @classmethod
    def open(
        cls,
        backbone_dir: Path,
        store_dir: Path,
        tasks: list[TaskSpec],
        device: str,
        dtype: str,
        max_batch_size: int,
        **engine: Any,
    ) -> EngineRig:
        """`engine`: EngineConfig fields beyond the defaults (e.g. max_batch_tokens, kv_block_size)."""
        config = EngineConfig(
            model=str(backbone_dir), device=device, dtype=dtype, max_batch_size=max_batch_size, **engine
        )
        backbone = load_backbone(config.model, device, dtype)
        store = TaskStore(store_dir, backbone.fingerprint, StoreLimits(max_virtual_tokens=1024))
        for task in tasks:
            store.register_dir(task.task_id, task.adapter_dir)
        rig = cls(backbone, store, Engine(backbone, replace(config, max_waiting=1 << 20)))
        rig.engine.step_listeners.append(lambda stats: rig.steps.add(stats))
        return rig

    def set_max_batch_size(self, max_batch_size: int) -> None:
        """Between runs only (the engine is idle): the scheduler reads its config at every admission."""
        assert not self.engine.has_work()
        config = self.engine.scheduler.config
        self.engine.scheduler.config = replace(config, max_batch_size=max_batch_size)

    def build(self, workload: Workload) -> tuple[list[Request], Recorder]:
        recorder = Recorder()
        requests = []
        for i, job in enumerate(workload.jobs):
            params = SamplingParams(max_new_tokens=job.max_new_tokens)
            generate = GenerateInput(job.text, (job.task_id,), None, params, request_id=str(i))
            requests.append(build_request(generate, self.backbone, self.store, INTAKE, recorder.sink))
        return requests, recorder

    def run(self, workload: Workload, mode: str = CONTINUOUS) -> RunResult:
        requests, recorder = self.build(workload)
        arrivals = [job.arrival_s for job in workload.jobs]
        self.steps = StepTotals()
        started, cpu_started = time.perf_counter(), time.process_time()
        recorder.started = started
        if mode == CONTINUOUS:
            self.run_continuous(requests, arrivals, started)
        else:
            self.run_static(requests, arrivals, started)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        assert self.engine.is_idle() and self.engine.memory.num_task_refs() == 0
        return recorder.result(workload, seconds, cpu_seconds, self.steps)

    def classify(self, workload: Workload) -> ClassifyRun:
        """Every job a classification request of one input under its task, all queued at t=0."""
        results: list[Results] = [{} for _ in workload.jobs]
        errors: list[Exception] = []
        requests = []
        for job, rows in zip(workload.jobs, results, strict=True):
            request = ClassifyInput((job.text,), (job.task_id,))
            requests += plan_classify(request, self.backbone, self.store, INTAKE, [result_sink(rows, errors)]).requests
        self.steps = StepTotals()
        started, cpu_started = time.perf_counter(), time.process_time()
        self.engine.add_all(requests)
        while self.engine.has_work():
            self.engine.step()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        assert self.engine.is_idle() and self.engine.memory.num_task_refs() == 0
        if errors:
            raise RuntimeError(f"{len(errors)} classification requests failed, the first: {errors[0]!r}")
        probs = [rows[0].probs for rows in results]
        return ClassifyRun(seconds, cpu_seconds, len(requests), probs, self.steps)

    def run_continuous(self, requests: list[Request], arrivals: list[float], started: float) -> None:
        """Requests join the running batch at the first step boundary after they arrive."""
        pending = deque(sorted(zip(arrivals, requests, strict=True), key=lambda pair: pair[0]))
        while pending or self.engine.has_work():
            now = time.perf_counter() - started
            while pending and pending[0][0] <= now:
                self.engine.add(pending.popleft()[1])
            if self.engine.has_work():
                self.engine.step()
            elif pending:
                time.sleep(pending[0][0] - now)

    def run_static(self, requests: list[Request], arrivals: list[float], started: float) -> None:
        """A batch of whatever has arrived (up to max_batch_size) runs until its last row ends; then the next."""
        max_batch_size = self.engine.scheduler.config.max_batch_size
        pending = deque(sorted(zip(arrivals, requests, strict=True), key=lambda pair: pair[0]))
        while pending:
            now = time.perf_counter() - started
            if pending[0][0] > now:
                time.sleep(pending[0][0] - now)
                now = time.perf_counter() - started
            num_rows = 0
            while pending and pending[0][0] <= now and num_rows + pending[0][1].num_rows <= max_batch_size:
                request = pending.popleft()[1]
                num_rows += request.num_rows
                self.engine.add(request)
            while self.engine.has_work():
                self.engine.step()


@dataclass
class Recorder:
    """The output sink of every request of one run: first-token and finish times, token ids (the engine's own
    events: turning them into text happens off the engine thread, in the server's event loop)."""

    started: float = 0.0
    first_token_at: dict[str, float] = field(default_factory=dict)
    finished_at: dict[str, float] = field(default_factory=dict)
    token_ids: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, Exception] = field(default_factory=dict)

    def sink(self, output: EngineOutput) -> None:
        now = time.perf_counter()
        self.first_token_at.setdefault(output.request_id, now)
        self.token_ids[output.request_id] += [token.id for token in output.tokens]
        if output.error is not None:
            self.errors[output.request_id] = output.error
        if output.finished or output.error is not None:
            self.finished_at[output.request_id] = now

    def result(self, workload: Workload, seconds: float, cpu_seconds: float, steps: StepTotals) -> RunResult:
        token_ids, ttft, latency, num_new = [], [], [], 0
        for i, job in enumerate(workload.jobs):
            if str(i) in self.errors:
                raise RuntimeError(f"request {i} failed: {self.errors[str(i)]!r}")
            ids = self.token_ids[str(i)]
            token_ids.append(ids)
            num_new += len(ids)
            arrived = self.started + job.arrival_s
            ttft.append(self.first_token_at[str(i)] - arrived)
            latency.append(self.finished_at[str(i)] - arrived)
        return RunResult(seconds, cpu_seconds, num_new, token_ids, ttft, latency, steps)


def result_sink(rows: Results, errors: list[Exception]) -> Callable[[EngineOutput], None]:
    """A classification input's sink: its rows' results (one row: one task). The engine swallows what a sink
    raises (a caller that is gone), so errors are kept and raised after the run."""

    def sink(output: EngineOutput) -> None:
        if output.error is not None:
            errors.append(output.error)
        rows.update({result.row: result for result in output.results})

    return sink
