"""The engine core, owned by one thread: schedule -> run -> postprocess -> emit, one step at a time."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from server.engine.backbone import Backbone
from server.engine.batch import Batch
from server.engine.detokenizer import find_stop
from server.engine.errors import GenerationFailed, InputTooLong, QueueFull
from server.engine.model_runner import ModelRunner, row_input_length
from server.engine.request import Request, Sequence, Status
from server.engine.sampler import sample
from server.engine.scheduler import Scheduler, SchedulerConfig, split_by_length
from server.engine.types import Completion, EnsembleMode, FinishReason, MemberResult, RequestOutput, StepStats, Token

if TYPE_CHECKING:
    from prompt_store.cache import PromptCache

logger = logging.getLogger(__name__)

StepListener = Callable[[StepStats], None]


class Engine:
    def __init__(self, backbone: Backbone, cache: PromptCache, scheduler_config: SchedulerConfig) -> None:
        self.backbone = backbone
        self.cache = cache
        self.runner = ModelRunner(backbone)
        self.scheduler: Scheduler[Request] = Scheduler(scheduler_config)
        self.batch: Batch | None = None
        self.num_steps = 0
        self.last_step: StepStats | None = None
        self.step_listeners: list[StepListener] = []
        self.leaving: list[Request] = []  # failed, or their caller cannot be reached: dropped after the step

    # ---- inbox commands (engine thread)

    def add(self, request: Request) -> None:
        reason = self.scheduler.why_never_fits(request)
        if reason is not None:
            self.emit_error(request, InputTooLong(reason))
        elif self.scheduler.is_full():
            self.emit_error(request, QueueFull(len(self.scheduler.waiting)))
        else:
            self.scheduler.add(request)

    def abort(self, request_id: str) -> None:
        request = self.scheduler.find(request_id)
        if request is not None:
            self.drop(request)
            logger.debug("aborted request %s", request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step

    def step(self) -> StepStats:
        started = time.perf_counter()
        admitted = self.scheduler.schedule()
        if admitted:
            rows, num_decode = self.prefill(admitted), 0
            num_prefill = sum(map(row_input_length, rows))
        else:
            rows, num_prefill, num_decode = self.decode(), 0, self.batch.size if self.batch else 0
        self.postprocess_finished(rows)
        self.drop_leaving()
        return self.record_step(rows, num_prefill, num_decode, time.perf_counter() - started)

    def prefill(self, requests: list[Request]) -> list[Sequence]:
        """Admitted requests run in passes grouped by length, then join the running batch together."""
        now = time.monotonic()
        for request in requests:
            request.status, request.first_scheduled_time = Status.RUNNING, now
            for row in request.rows:
                row.device_task = self.cache.acquire(row.task) if row.task else None
        sizes = [(request.num_rows, max(map(row_input_length, request.rows))) for request in requests]
        joining, new_rows = [self.batch] if self.batch is not None else [], []
        for indices in split_by_length(sizes, self.scheduler.config.prefill_split_tokens):
            rows = [row for i in indices for row in requests[i].rows]
            prefilled, logits = self.runner.prefill(rows)
            self.append_tokens(rows, logits)
            new_rows += rows
            if (unfinished := without_finished(prefilled)) is not None:
                joining.append(unfinished)
        self.batch = Batch.concatenate(*joining) if joining else None
        return new_rows

    def decode(self) -> list[Sequence]:
        if self.batch is None:
            return []
        last_tokens = torch.tensor([row.output_ids[-1] for row in self.batch.rows], dtype=torch.long)
        self.batch, logits = self.runner.decode(self.batch, last_tokens)
        rows = self.batch.rows
        self.append_tokens(rows, logits)
        self.batch = without_finished(self.batch)
        return rows

    def append_tokens(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        rows, logits = self.fail_broken_rows(rows, logits)
        token_ids, logprobs = sample(logits, rows)
        for row, token_id, logprob in zip(rows, token_ids, logprobs, strict=True):
            self.append_token(row, token_id, logprob)
        for request in distinct_requests(rows):
            if not request.is_finished:  # a finishing request's last token rides with its completion
                self.emit_tokens(request)

    def fail_broken_rows(self, rows: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """Rows whose logits are not finite (a task's values overflow the backbone's dtype) fail their own request;
        the rest of the batch samples on."""
        broken = ~logits.amax(dim=-1).isfinite()  # amax is NaN with any NaN, inf with any inf, -inf if all are
        if not bool(broken.any()):
            return rows, logits
        failing = {id(rows[i].request): rows[i] for i in broken.nonzero().flatten().tolist()}
        for row in failing.values():
            task = f"task {row.task_id!r} version {row.task_version}" if row.task else "the bare backbone"
            error = GenerationFailed(
                f"expected finite logits; found NaN or infinity under {task}: its values overflow the backbone's "
                f"{str(self.backbone.dtype).removeprefix('torch.')} activations"
            )
            self.fail(row.request, error)
        keep = [i for i, row in enumerate(rows) if id(row.request) not in failing]
        return [rows[i] for i in keep], logits[keep]

    def append_token(self, row: Sequence, token_id: int, logprob: float) -> None:
        row.output_ids.append(token_id)
        row.logprobs.append(logprob)
        if token_id in self.backbone.eos_token_ids:
            row.tokens.append(Token(token_id, "", logprob))
            row.text += row.decoder.flush(row.output_ids)
            row.finish_reason = FinishReason.EOS
            return
        new_text = row.decoder.next_text(row.output_ids)
        row.text += new_text
        row.tokens.append(Token(token_id, new_text, logprob))
        stop_at = find_stop_in(row, len(new_text))
        if stop_at is not None:
            row.text, row.finish_reason = row.text[:stop_at], FinishReason.STOP
        elif len(row.output_ids) >= row.request.max_new_tokens:
            row.text += row.decoder.flush(row.output_ids)
            row.finish_reason = FinishReason.LENGTH

    def postprocess_finished(self, rows: list[Sequence]) -> None:
        for row in rows:
            if row.is_finished:
                self.release(row)
        for request in distinct_requests(rows):
            if request.is_finished and request.status is not Status.FINISHED:
                self.complete(request)

    # ---- leaving

    def complete(self, request: Request) -> None:
        request.status = Status.FINISHED
        self.scheduler.remove(request)
        last_token = None if request.ensemble is EnsembleMode.VOTE else request.rows[0].tokens[-1]
        self.deliver(request, RequestOutput(request.request_id, token=last_token, completion=build_completion(request)))

    def drop(self, request: Request) -> None:
        """Remove a request from wherever it is, freeing its rows' KV and task references."""
        request.status = Status.FINISHED
        self.scheduler.remove(request)
        if self.batch is not None:
            keep = [i for i, row in enumerate(self.batch.rows) if row.request is not request]
            if len(keep) < self.batch.size:
                self.batch = self.batch.filter(keep) if keep else None
        for row in request.rows:
            self.release(row)

    def fail_running(self, error: Exception) -> None:
        """A step failed: every running request gets the error; the engine starts over with an empty batch."""
        for request in list(self.scheduler.running):
            self.drop(request)
            self.emit_error(request, error)
        self.batch = None

    def fail_all(self, error: Exception) -> None:
        self.fail_running(error)
        for request in list(self.scheduler.waiting):
            self.drop(request)
            self.emit_error(request, error)

    def release(self, row: Sequence) -> None:
        if row.device_task is not None:
            self.cache.release(row.device_task.key)
            row.device_task = None

    # ---- emitting

    def emit_tokens(self, request: Request) -> None:
        if request.ensemble is EnsembleMode.VOTE:
            return  # the answer is known only once every member has finished
        self.deliver(request, RequestOutput(request.request_id, token=request.rows[0].tokens[-1]))

    def emit_error(self, request: Request, error: Exception) -> None:
        self.deliver(request, RequestOutput(request.request_id, error=error))

    def deliver(self, request: Request, output: RequestOutput) -> None:
        """Hand an output to the caller; a caller that is gone (its event loop closed) costs only its own request."""
        try:
            request.sink(output)
        except Exception as error:
            logger.warning("request %s: cannot reach its caller (%s); dropping it", request.request_id, error)
            self.leaving.append(request)

    def fail(self, request: Request, error: Exception) -> None:
        """One request fails mid-step; it leaves the batch once the step is over."""
        self.emit_error(request, error)
        self.leaving.append(request)

    def drop_leaving(self) -> None:
        leaving, self.leaving = self.leaving, []
        for request in leaving:
            if request.status is not Status.FINISHED:
                self.drop(request)

    def record_step(self, rows: list[Sequence], num_prefill: int, num_decode: int, seconds: float) -> StepStats:
        self.num_steps += 1
        stats = StepStats(
            batch_size=len(rows),
            num_distinct_tasks=len({row.task.key for row in rows if row.task}),
            num_prefill_tokens=num_prefill,
            num_decode_tokens=num_decode,
            num_waiting=len(self.scheduler.waiting),
            step_seconds=seconds,
        )
        self.last_step = stats
        for listener in self.step_listeners:
            listener(stats)
        return stats


def without_finished(batch: Batch) -> Batch | None:
    keep = [i for i, row in enumerate(batch.rows) if not row.is_finished]
    if len(keep) == batch.size:
        return batch
    return batch.filter(keep) if keep else None


def distinct_requests(rows: list[Sequence]) -> list[Request]:
    return list({id(row.request): row.request for row in rows}.values())


def find_stop_in(row: Sequence, num_new_chars: int) -> int | None:
    stop = row.request.sampling.stop
    return find_stop(row.text, stop, num_new_chars) if stop and num_new_chars else None


def build_completion(request: Request) -> Completion:
    answer = vote(request.rows) if request.ensemble is EnsembleMode.VOTE else request.rows[0]
    assert answer.finish_reason is not None
    members, task = None, (answer.task_id, answer.task_version)
    if request.ensemble is EnsembleMode.MEAN:
        task = (None, None)  # the answer comes from all members together
    if request.ensemble is not None:
        members = tuple(MemberResult(row.task_id, row.task_version, row.text) for row in request.rows)
    return Completion(
        generated_text=answer.text,
        finish_reason=answer.finish_reason,
        generated_tokens=len(answer.output_ids),
        input_tokens=request.num_input_tokens,
        task_id=task[0],
        task_version=task[1],
        tokens=tuple(answer.tokens),
        members=members,
        queue_seconds=(request.first_scheduled_time or request.arrival_time) - request.arrival_time,
    )


def vote(rows: list[Sequence]) -> Sequence:
    """The most frequent text wins; ties go to the higher mean token log-probability (Lester et al. 2021)."""
    counts = Counter(row.text for row in rows)
    return max(rows, key=lambda row: (counts[row.text], row.mean_logprob))
