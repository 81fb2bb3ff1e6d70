"""The engine core, owned by one thread: schedule -> run -> postprocess -> emit, one step at a time."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import torch

from prompt_store.types import SEQ_CLS, TaskKey
from server.engine import host_memory
from server.engine.adapter_slots import AdapterSlots
from server.engine.backbone import Backbone
from server.engine.config import EngineConfig, default_max_batch_tokens
from server.engine.errors import InputTooLong, NonFiniteOutput, QueueFull, UnknownToken, UnservableTarget
from server.engine.intake import check_token_ids
from server.engine.isolation import guarded, isolated
from server.engine.kinds.base import StepResult
from server.engine.kv_memory import KVMemory
from server.engine.kv_pool import HOST, KVPool, pool_blocks
from server.engine.memory_profile import MemoryProbe, WorstStep, describe_pool, pool_budget, probe_for, profile_memory
from server.engine.model_runner import ModelRunner, Prompts
from server.engine.paged_flex import attention_backend
from server.engine.readout import Classified, Readout
from server.engine.request import RankedTarget, Request, Sequence, Status, TokenSink
from server.engine.sampler import draws, sample, score, suppress_eos
from server.engine.scheduler import Chunk, Scheduler, SchedulerConfig
from server.engine.task_cache import TaskCache
from server.engine.types import EngineOutput, FinishReason, RowResult, RowToken, StepStats

logger = logging.getLogger(__name__)

StepListener = Callable[[StepStats], None]
T = TypeVar("T")


class Engine:
    """The engine core, built from one config: KV pool and memory, device task cache, scheduler, model runner."""

    def __init__(self, backbone: Backbone, config: EngineConfig, probe: MemoryProbe | None = None) -> None:
        """`probe`: the device memory's (None: CUDA's on a GPU; a CPU's pool is not profiled)."""
        self.backbone = backbone
        self.config = config
        fp, device, dtype, block_size = backbone.fingerprint, backbone.device, backbone.dtype, config.kv_block_size
        attention = attention_backend(config.attention_backend, device, block_size)  # refused before any allocation
        if device.type == "cpu":
            host_memory.keep_freed_memory()  # the steps' temporaries reuse freed memory, not fresh pages
        layers = backbone.kind.num_pool_layers(fp)
        worst, probe = WorstStep.of(config, backbone), probe or probe_for(device)
        profile = profile_memory(backbone, worst, probe, layers, block_size) if probe is not None else None
        self.memory_profile = profile
        num_blocks = pool_blocks(fp, layers, block_size, dtype, pool_budget(config, profile))
        adapter_bytes = config.adapter_cache_bytes
        self.pool = KVPool.allocate(fp, layers, num_blocks + 1, block_size, dtype, device)  # + block 0
        logger.info(describe_pool(num_blocks, self.pool.block_bytes, block_size, profile))
        self.memory = KVMemory(num_blocks, config.kv_block_size)
        slots = AdapterSlots(config.max_loras)
        self.tasks = TaskCache(backbone, self.pool, self.memory, config.prompt_cache_bytes, slots, adapter_bytes)
        self.runner = ModelRunner(backbone, self.pool, self.tasks, worst.limits, attention)
        step_tokens = config.max_batch_tokens or default_max_batch_tokens(device.type)
        scheduler_config = SchedulerConfig(config.max_batch_size, step_tokens, config.max_waiting)
        self.scheduler = Scheduler(scheduler_config, self.memory, slots)
        self.num_steps = 0
        self.num_preemptions = 0
        self.last_step: StepStats | None = None
        self.step_listeners: list[StepListener] = []
        self.leaving: list[Request] = []  # failed, or their caller cannot be reached: dropped after the step

    # ---- inbox commands (engine thread)

    def add(self, request: Request) -> None:
        reason = self.scheduler.why_never_fits(request)
        unknown = self.unknown_token(request)
        if unknown is not None:
            self.emit_error(request, unknown)
        elif reason is not None:
            self.emit_error(request, InputTooLong(reason))
        elif self.scheduler.is_full():
            self.emit_error(request, QueueFull(len(self.scheduler.waiting)))
        else:
            self.scheduler.add(request)

    def unknown_token(self, request: Request) -> UnknownToken | None:
        """Intake checks a request's token ids; this catches any path around it (a token the embedding table has no
        row for would fail the whole step's pass)."""
        try:
            check_token_ids(self.backbone, request.input_ids)
            for row in request.rows:
                check_token_ids(self.backbone, row.targets, "candidates")
        except UnknownToken as error:
            return error
        return None

    def add_all(self, requests: list[Request]) -> None:
        """Requests of one call (a classification's inputs, a scoring's candidates): queued together."""
        for request in requests:
            self.add(request)

    def probe(self, request: Request) -> None:
        """A request of the engine's own (a new task's probe, the start-up self-check's rows): at the head of the
        queue, never refused for a full queue, so a registration does not wait behind the load."""
        reason = self.scheduler.why_never_fits(request)
        if reason is not None:
            self.emit_error(request, InputTooLong(reason))
        else:
            self.scheduler.add_first(request)

    def abort(self, request_id: str) -> None:
        request = self.scheduler.find(request_id)
        if request is not None:
            self.drop(request)
            self.release_unheld()  # no step may follow: an idle engine keeps no copy of the request's tasks
            logger.debug("aborted request %s", request_id)

    def retire_task(self, task_id: str, keep_version: int | None) -> None:
        self.tasks.retire(task_id, keep_version)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def is_idle(self) -> bool:
        """Nothing queued or running, and every block is free or holds an unused task."""
        return not self.has_work() and self.memory.num_available_blocks == self.memory.num_blocks

    # ---- the step

    def step(self) -> StepStats:
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        self.release_stacks()  # after admission: a task whose rows ended and whose next rows start keeps its place
        self.num_preemptions += len(plan.preempted)
        chunks, prompts = self.prepare(plan.admitted, plan.chunks)
        num_decode, num_prefill = decode_and_prefill_tokens(chunks)  # before the step appends tokens
        rows = self.run(chunks, prompts)
        self.postprocess_finished(rows)
        self.drop_leaving()
        stats = self.record_step(chunks, num_prefill, num_decode, time.perf_counter() - started)
        return stats

    def prepare(self, admitted: list[Request], chunks: list[Chunk]) -> tuple[list[Chunk], Prompts]:
        """What belongs to one request is made ready before the shared pass (its tasks' keys and values, its prompt
        vectors); a request whose preparation fails leaves the step with the error, alone."""
        self.start(admitted)
        prompts: Prompts = {}
        for row in self.runner.prompt_rows(chunks):
            if row.task is not None and row.task.key not in prompts and not self.is_leaving(row.request):
                vectors = self.guarded(
                    row.request, f"loading {describe(row)}", partial(self.tasks.embeddings_of, row.task)
                )
                if vectors is not None:
                    prompts[row.task.key] = vectors
        return [
            chunk for chunk in chunks if not self.is_leaving(chunk.row.request)
        ] if self.leaving else chunks, prompts

    def start(self, requests: list[Request]) -> None:
        """Newly admitted (or resumed) requests: their tasks' keys and values into the pool, if not there yet."""
        now = time.monotonic()
        for request in requests:
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            for row in request.rows:
                if row.task is None or self.is_leaving(request):
                    continue
                if row.task_blocks is not None:
                    self.guarded(
                        request, f"loading {describe(row)}", partial(self.tasks.fill, row.task_blocks, row.task)
                    )
                elif row.holds_adapter:
                    self.guarded(request, f"loading {describe(row)}", partial(self.tasks.adapter_of, row.task))

    def run(self, chunks: list[Chunk], prompts: Prompts) -> list[Sequence]:
        """One forward pass over the chunks; the rows that reached their last token are sampled, classified or
        scored, each request's part apart from the others'. Returns them."""
        chunks, readout, result = self.forward(chunks, prompts)
        if result is None:
            return []
        for chunk in chunks:
            chunk.row.num_computed += chunk.num_tokens
        if readout.sampled:
            assert result.logits is not None
            self.append_tokens(readout.sampled, result.logits[: len(readout.sampled)])
        if readout.scored:
            assert result.logits is not None
            self.record_scores(readout.scored, result.logits[len(readout.sampled) :])
        if readout.classified:
            assert result.hidden is not None
            self.classify(readout.classified, result.hidden)
        self.complete([row for row in readout.completed if not self.is_leaving(row.request)])
        return readout.sampled + readout.completed

    def forward(self, chunks: list[Chunk], prompts: Prompts) -> tuple[list[Chunk], Readout, StepResult | None]:
        """The shared pass over the chunks (None: no chunk). A LoRA / IA3 task whose target module the pass finds it
        cannot adapt fails its own requests, and the pass runs again without them (it writes the same keys and values
        again for the rest); later loads of a task targeting that module fail at once."""
        while chunks:
            readout = Readout.of(chunks)
            try:
                return chunks, readout, self.runner.run(chunks, readout, prompts)
            except UnservableTarget as error:
                logger.warning("failing the requests of a LoRA / IA3 task the pass cannot adapt: %s", error)
                self.tasks.adapters.hooks.unservable[error.module] = error.found
                for request in distinct_requests([chunk.row for chunk in chunks]):
                    if any(row.task is not None and row.task.key in error.keys for row in request.rows):
                        self.fail(request, error)
                chunks = [chunk for chunk in chunks if not self.is_leaving(chunk.row.request)]
        return chunks, Readout(), None

    # ---- one request's part of the step: its failure is its own (see isolation.py)

    def guarded(self, request: Request, what: str, action: Callable[[], T]) -> T | None:
        return guarded(request, what, action, self.fail)

    def is_leaving(self, request: Request) -> bool:
        return any(leaving is request for leaving in self.leaving)

    def record_scores(self, scored: list[tuple[Sequence, int]], logits: torch.Tensor) -> None:
        """Each scored position's log-probability of its target token, and for a request that asks for them
        (a prompt's log-probabilities) its rank and the most likely tokens; a row recomputed after a preemption
        writes the same values again."""

        def logprobs_of(items: list[int]) -> list[tuple[float, RankedTarget]]:
            targets = [scored[i][0].targets[scored[i][1]] for i in items]
            return score(rows_of(logits, items), targets, [scored[i][0] for i in items])

        parts = isolated(len(scored), lambda i: scored[i][0].request, logprobs_of, "scoring the candidate", self.fail)
        for items, results in parts:
            for (row, j), (logprob, ranks) in zip([scored[i] for i in items], results, strict=True):
                if len(row.target_logprobs) != len(row.targets):
                    row.target_logprobs = [0.0] * len(row.targets)
                    row.target_ranks = [(0, ())] * len(row.targets)
                row.target_logprobs[j] = logprob
                row.target_ranks[j] = ranks

    def classify(self, classified: list[Classified], hidden: torch.Tensor) -> None:
        """Each task's head over its rows' hidden states, the rows of one task version in one call; each row keeps
        its probabilities ([labels] for a sequence task, [input tokens, labels] for a token task) on the CPU."""
        for group in head_groups(classified):
            self.classify_group(group, hidden)

    def classify_group(self, group: list[Classified], hidden: torch.Tensor) -> None:
        def probs_of(items: list[int]) -> torch.Tensor:
            return head_probs(self.tasks, self.backbone, [group[i] for i in items], hidden)

        what = f"{describe(group[0].row)}'s head"
        parts = isolated(len(group), lambda i: group[i].row.request, probs_of, what, self.fail)
        for items, probs in parts:
            chosen = [group[i] for i in items]
            for item, row_probs in zip(chosen, probs.split([item.count for item in chosen]), strict=True):
                item.row.probs = row_probs[0] if item.row.request.head_type == SEQ_CLS else row_probs

    def complete(self, rows: list[Sequence]) -> None:
        """Classification and scoring rows computed in full: each answers once; non-finite answers fail their own
        request (its task's values overflow the backbone's dtype)."""
        results: dict[int, list[RowResult]] = defaultdict(list)
        for row in rows:
            row.done = True
            result = row_result(row)
            values = row.probs if row.probs is not None else torch.tensor(row.target_logprobs, device=HOST)
            if not bool(values.isfinite().all()):
                self.fail(row.request, self.overflow(row))
            else:
                results[id(row.request)].append(result)
        for request in distinct_requests(rows):
            if request in self.leaving:
                continue
            self.deliver(request, EngineOutput(request.request_id, results=tuple(results[id(request)]),
                                               finished=request.is_finished))  # fmt: skip

    def overflow(self, row: Sequence) -> NonFiniteOutput:
        task = describe(row)
        dtype = str(self.backbone.dtype).removeprefix("torch.")
        return NonFiniteOutput(
            f"expected finite logits; found NaN or infinity under {task}: its values overflow the backbone's {dtype} "
            "activations"
        )

    def append_tokens(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """Every sampled row's next token, from one sampling of the batch (request by request only if that fails);
        rows whose logits are not finite (a task's values overflow the backbone's dtype) fail their own request and
        the rest of the batch goes on. Each request's new tokens go to its caller in one output."""
        allowed = suppress_eos(logits, rows, self.backbone.eos_token_ids)  # rows short of their min_tokens
        uniforms = draws(rows)  # drawn once: a retry request by request samples with the same
        parts = isolated(
            len(rows), lambda i: rows[i].request,
            lambda items: sample(rows_of(allowed, items), [rows[i] for i in items], uniforms[items]),
            "sampling the next token", self.fail,
        )  # fmt: skip
        broken = {id(rows[i].request): rows[i] for items, sampled in parts if not all(sampled.is_finite)
                  for i, ok in zip(items, sampled.is_finite, strict=True) if not ok}  # fmt: skip
        for row in broken.values():
            self.fail(row.request, self.overflow(row))
        several: dict[Request, list[RowToken]] = {}  # the requests of several rows, in the order of their first rows
        for items, sampled in parts:
            for i, token_id, logprob, top in zip(items, sampled.token_ids, sampled.logprobs, sampled.top, strict=True):
                row = rows[i]
                request = row.request
                if broken and id(request) in broken:
                    continue
                finish_reason = self.append_token(row, token_id, logits, i)
                if len(request.rows) == 1:  # most requests: its output at once, the row's ending the request's
                    self.deliver_token(request, row.index, token_id, logprob, finish_reason, top)
                    continue
                token = RowToken(row.index, token_id, logprob, finish_reason, top)
                if (tokens := several.get(request)) is None:  # by identity (eq=False); no default made per row
                    several[request] = [token]
                else:
                    tokens.append(token)
        for request, tokens in several.items():  # the last token's row going on: the request goes on
            finished = tokens[-1].finish_reason is not None and request.is_finished
            self.deliver(request, EngineOutput(request.request_id, tuple(tokens), finished))

    def append_token(self, row: Sequence, token_id: int, logits: torch.Tensor, i: int) -> FinishReason | None:
        """The row's new token (its logits are row i of `logits`); returns the token-level ending it reached: stop
        sequences are found on the text, off this thread (see output.py)."""
        row.output_ids.append(token_id)
        if token_id in self.backbone.eos_token_ids and not row.request.sampling.ignore_eos:
            row.finish_reason = FinishReason.EOS
        elif len(row.output_ids) >= row.request.max_new_tokens:
            row.finish_reason = FinishReason.LENGTH
        if row.request.keeps_probe_vectors:
            keep_probe_vector(row, logits, i)
        return row.finish_reason

    def postprocess_finished(self, rows: list[Sequence]) -> None:
        finished = [row for row in rows if row.is_finished]
        for row in finished:
            self.scheduler.free_row(row)
        for request in distinct_requests(finished):  # a request that finished in the step has a row that did
            if request.is_finished and request.status is not Status.FINISHED:
                self.drop(request)  # its last output said `finished`

    # ---- leaving

    def stop_rows(self, request_id: str, rows: list[int]) -> None:
        """Rows whose text reached a stop sequence end now; a request left with no row running is dropped."""
        request = self.scheduler.find(request_id)
        if request is None:
            return
        for index in rows:
            row = request.rows[index]
            if not row.is_finished:
                row.finish_reason = FinishReason.STOP
                self.scheduler.free_row(row)
        if request.is_finished:
            self.drop(request)

    def drop(self, request: Request) -> None:
        """Remove a request from wherever it is, freeing its rows' blocks and task references."""
        request.status = Status.FINISHED
        self.scheduler.remove(request)

    def fail_running(self, error: Exception) -> None:
        """A step failed: every running request gets the error (but one already failed in the step, which has
        its own); the engine starts over with nothing running."""
        for request in list(self.scheduler.running):
            if not self.is_leaving(request):
                self.emit_error(request, error)
            self.drop(request)
        self.drop_leaving()

    def refuse(self, requests: list[Request], error: Exception) -> None:
        """Requests a failed command carried: out of the engine, wherever they got to, each told why."""
        for request in requests:
            if request.status is not Status.FINISHED:
                self.drop(request)
                self.emit_error(request, error)

    def fail_all(self, error: Exception) -> None:
        self.fail_running(error)
        for request in list(self.scheduler.waiting):
            self.drop(request)
            self.emit_error(request, error)

    # ---- emitting

    def emit_error(self, request: Request, error: Exception) -> None:
        self.deliver(request, EngineOutput(request.request_id, error=error))

    def deliver(self, request: Request, output: EngineOutput) -> None:
        """Hand an output to the caller; a caller that is gone (its event loop closed) costs only its own request."""
        try:
            request.sink(output)
        except Exception as error:
            self.unreachable(request, error)

    def deliver_token(
        self, request: Request, row: int, token_id: int, logprob: float, finish_reason: FinishReason | None,
        top: tuple[tuple[int, float], ...],
    ) -> None:  # fmt: skip
        """A one-row request's new token, its whole output of the step (the row's ending is the request's): a
        `TokenSink` takes it as values; any other sink gets its EngineOutput."""
        sink = request.sink
        if not isinstance(sink, TokenSink):
            token = RowToken(row, token_id, logprob, finish_reason, top)
            self.deliver(request, EngineOutput(request.request_id, (token,), finish_reason is not None))
            return
        try:
            sink.put_token(request.request_id, row, token_id, logprob, finish_reason, top)
        except Exception as error:
            self.unreachable(request, error)

    def unreachable(self, request: Request, error: Exception) -> None:
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
        self.release_unheld()

    def release_unheld(self) -> None:
        """After rows left: LoRA / IA3 versions retired (a probe's) that no row holds any more go, and, when the
        engine has nothing left to run, the stacks."""
        self.tasks.adapters.drop_retired()
        if not self.has_work():
            self.release_stacks()

    def release_stacks(self) -> None:
        """The stacked LoRA / IA3 copies of tasks no running row holds go: at the start of each step, once the step's
        rows are admitted (so a batch that ends and the next one, of the same tasks, do not copy them again), and
        when the engine has nothing left to run."""
        self.tasks.adapters.hooks.drop_stacks(self.tasks.adapters.slots.is_held)

    def record_step(self, chunks: list[Chunk], num_prefill: int, num_decode: int, seconds: float) -> StepStats:
        self.num_steps += 1
        tasks = {id(chunk.row.task): chunk.row.task for chunk in chunks}  # by identity first: no key made per row
        stats = StepStats(
            batch_size=len(chunks),
            num_distinct_tasks=len({task.key for task in tasks.values() if task is not None}),
            num_prefill_tokens=num_prefill,
            num_decode_tokens=num_decode,
            num_waiting=len(self.scheduler.waiting),
            step_seconds=seconds,
            cache_events=self.tasks.take_events(),
        )
        self.last_step = stats
        for listener in self.step_listeners:
            listener(stats)
        return stats


def head_groups(classified: list[Classified]) -> list[list[Classified]]:
    """The classified rows by task version and head type: each group's head runs in one call."""
    groups: dict[tuple[TaskKey | None, str | None], list[Classified]] = defaultdict(list)
    for item in classified:
        groups[(item.row.task.key if item.row.task else None, item.row.request.head_type)].append(item)
    return list(groups.values())


def head_probs(tasks: TaskCache, backbone: Backbone, items: list[Classified], hidden: torch.Tensor) -> torch.Tensor:
    """One task's head over its rows' hidden states: probabilities [rows' tokens, labels] on the CPU; a probe's
    rows keep the last hidden state their head read."""
    head_type = items[0].row.request.head_type
    assert head_type is not None
    task, head = items[0].row.task, backbone.heads[head_type]
    tensors = tasks.head_of(task) if task is not None else bare_tensors(backbone)
    features = torch.cat([hidden[item.first : item.first + item.count] for item in items])
    for item in items:
        if item.row.request.keeps_probe_vectors:
            item.row.probe_vector = hidden[item.first + item.count - 1].float().cpu()
    if head_type == SEQ_CLS:
        features = features[:, None]  # [R, 1, H]: the one token each row's head reads, as the head model's
    return torch.softmax(head.logits(features, tensors), dim=-1).cpu()


def row_result(row: Sequence) -> RowResult:
    """A classification or scoring row's answer (a prompt scoring's with each target's rank and alternatives)."""
    if not row.targets:
        return RowResult(row.index, row.probs)
    if row.request.sampling.top_logprobs is None:
        return RowResult(row.index, logprobs=tuple(row.target_logprobs))
    ranks = tuple(rank for rank, _ in row.target_ranks)
    top = tuple(alternatives for _, alternatives in row.target_ranks)
    return RowResult(row.index, logprobs=tuple(row.target_logprobs), ranks=ranks, top=top)


def bare_tensors(backbone: Backbone) -> dict[str, torch.Tensor]:
    assert backbone.bare_head is not None, "intake refuses a classification with no task on a backbone without a head"
    return backbone.bare_head.tensors


def describe(row: Sequence) -> str:
    return f"task {row.task_id!r} version {row.task_version}" if row.task else "the bare backbone"


def keep_probe_vector(row: Sequence, logits: torch.Tensor, i: int) -> None:
    """A probe's row (`keeps_probe_vectors`) keeps its first logit vector (logits [B, V], the row's is i): a new
    task's probe judges its rows by them (see probe.py)."""
    if row.probe_vector is None:
        row.probe_vector = logits[i].float().cpu()


def rows_of(tensor: torch.Tensor, items: list[int]) -> torch.Tensor:
    """The rows `items` of a batch's tensor: the tensor itself when they are all of them (no copy, no index)."""
    return tensor if len(items) == tensor.shape[0] else tensor[items]


def distinct_requests(rows: list[Sequence]) -> list[Request]:
    return list({id(row.request): row.request for row in rows}.values())


def decode_and_prefill_tokens(chunks: list[Chunk]) -> tuple[int, int]:
    """A row's next token after its first is decode; everything else is prefill, an encoder-decoder row's encoder
    input included (it runs in the step that starts the row)."""
    num_decode = sum(1 for chunk in chunks if chunk.num_tokens == 1 and chunk.row.output_ids)
    encoded = sum(chunk.row.encoder_length for chunk in chunks if chunk.start == 0)
    return num_decode, sum(chunk.num_tokens for chunk in chunks) - num_decode + encoded
