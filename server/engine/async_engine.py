"""The engine thread and its asyncio face: an inbox drained at step boundaries, per-request output queues.

Only the engine thread touches the model, the batch, the KV cache and the prompt cache; other threads
put commands into the inbox. No locks inside the engine. A step's outputs reach each caller's event loop in one
hand-off (vLLM's output handler takes one batch per step), not one wake-up per request.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

import torch

from prompt_store.adapter import StoreLimits
from prompt_store.backend import StoreTimeouts
from prompt_store.registry import StoreEvent, TaskStore
from prompt_store.types import TaskArtifact, TaskRecord
from server import __version__
from server.engine.backbone import Backbone, load_backbone
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.errors import EngineUnavailable, GenerationFailed
from server.engine.intake import IntakeConfig, build_request, check_token_ids, render_chat
from server.engine.nlu import Results, plan_classify, plan_score, predictions, scores
from server.engine.output import OutputProcessor
from server.engine.probe import Probe
from server.engine.prompt_scoring import plan_prompt_score, prompt_tokens
from server.engine.request import Request, TokenSink
from server.engine.selfcheck import self_check
from server.engine.task_cache import is_user_task
from server.engine.types import (
    Classification,
    ClassifyInput,
    EngineInfo,
    EngineOutput,
    EngineStats,
    FinishReason,
    GenerateInput,
    PromptScoreInput,
    PromptToken,
    RequestOutput,
    RowToken,
    ScoreInput,
    Scores,
    StepStats,
    TokenizerInfo,
)

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5
LIVENESS_CHECK_S = 0.25  # a caller waiting on a stopped engine hears of it within this


@dataclass(frozen=True, slots=True)
class Command:
    """Work for the engine thread; the requests whose callers wait on it get its failure."""

    run: Callable[[], None]
    requests: tuple[Request, ...] = ()


class AsyncEngine:
    """Satisfies server.engine.interface.EngineClient."""

    def __init__(self, engine: Engine, store: TaskStore, config: EngineConfig) -> None:
        self.engine = engine
        self.store = store
        self.config = config
        self.limits = IntakeConfig(config.max_input_tokens, config.max_new_tokens_limit, config.cache_prompt_kv)
        self.inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()  # see send
        self.thread = threading.Thread(target=self.run, name="promptserve-engine", daemon=True)
        self.stopping = threading.Event()
        self.progress_at = time.monotonic()  # the engine thread's last sign of life: a step done, or the inbox read
        self.outbox = Outbox()
        store.add_listener(self.on_store_event)

    @property
    def backbone(self) -> Backbone:
        return self.engine.backbone

    # ---- lifecycle

    def start(self) -> None:
        self.thread.start()
        if self.config.poll_interval_s > 0:
            self.store.start_polling(self.config.poll_interval_s, self.config.store_rescan_s)

    def shutdown(self) -> None:
        self.store.stop_polling()
        self.stopping.set()
        self.send(lambda: None)  # wake the loop
        self.thread.join(timeout=30)
        gc.unfreeze()  # what start-up froze can be collected again (tests build engine after engine in one process)

    def send(self, action: Callable[[], None], *requests: Request) -> None:
        """Hand work to the engine thread; if it fails there, `requests` fail with it (their callers hear of it)."""
        self.inbox.put(Command(action, requests))

    def is_ready(self) -> bool:
        return self.thread.is_alive() and not self.stopping.is_set()

    def stalled_seconds(self) -> float:
        """How long the engine has had work without finishing a step or reading its inbox (0 while idle): a
        forward pass that hangs grows it; read from other threads (liveness)."""
        if not self.engine.has_work():
            return 0.0
        return max(0.0, time.monotonic() - self.progress_at)

    # ---- the engine thread

    def run(self) -> None:
        logger.info("engine thread started")
        computed = True
        try:
            while not self.stopping.is_set():
                # a step that computed nothing (every request waits for memory) waits for news instead of spinning
                self.drain_inbox(block=not self.engine.has_work() or not computed)
                self.progress_at = time.monotonic()
                if self.engine.has_work() and not self.stopping.is_set():
                    computed = self.step_once()
                    self.progress_at = time.monotonic()
            self.drain_inbox(block=False)
        finally:  # stopping, or the loop itself failed: nobody is left waiting
            self.engine.fail_all(EngineUnavailable("the server is shutting down"))
            self.outbox.flush()
            logger.info("engine thread stopped")

    def drain_inbox(self, block: bool) -> None:
        try:
            command = self.inbox.get(timeout=IDLE_WAIT_S) if block else self.inbox.get_nowait()
            while True:
                run_command(self.engine, command)
                command = self.inbox.get_nowait()
        except queue.Empty:
            return
        finally:
            self.outbox.flush()  # the commands' refusals

    def step_once(self) -> bool:
        """One step, its outputs handed to the callers' loops; whether it computed anything."""
        try:
            return self.engine.step().batch_size > 0
        except Exception as error:  # the loop must survive: fail the running requests, keep serving
            logger.exception("engine step failed; failing the running requests")
            self.engine.fail_running(EngineUnavailable(f"the engine step failed: {error}"))
            return True
        finally:
            self.outbox.flush()

    # ---- generation

    async def generate(self, request: GenerateInput) -> AsyncIterator[RequestOutput]:
        """The request's outputs; its tokens become text here, on the caller's loop, not on the engine thread."""
        if not self.is_ready():
            raise EngineUnavailable("the engine is not running")
        events: asyncio.Queue[EngineOutput] = asyncio.Queue()
        sink = self.outbox.sink(asyncio.get_running_loop(), events)
        prepared = await asyncio.to_thread(build_request, request, self.backbone, self.store, self.limits, sink)
        processor = OutputProcessor(prepared, self.backbone.tokenizer)
        self.send(partial(self.engine.add, prepared), prepared)
        engine_done = False
        try:
            while not processor.is_finished:
                event = await self.next_event(events)
                engine_done = event.finished or event.error is not None
                processed = processor.process(event)
                if processed.stopped_rows and not processed.is_finished:
                    self.send(partial(self.engine.stop_rows, prepared.request_id, processed.stopped_rows), prepared)
                for output in processed.outputs:
                    if output.error is not None:
                        raise output.error
                    yield output
        finally:
            if not engine_done:  # the caller left, or a stop sequence ended it before the engine did
                self.send(partial(self.engine.abort, prepared.request_id))

    # ---- classification and scoring

    async def classify(self, request: ClassifyInput) -> Classification:
        """Every input's prediction; its rows share the engine's steps with everyone else's."""
        sinks, results = self.result_sinks(len(request.inputs))
        plan = await asyncio.to_thread(plan_classify, request, self.backbone, self.store, self.limits, sinks)
        answers = await self.run_all(plan.requests, results)
        return Classification(
            predictions=predictions(plan, request.inputs, answers, request.top_k),
            task_type=plan.head_type,
            input_tokens=sum(r.num_input_tokens for r in plan.requests),
        )

    async def score(self, request: ScoreInput) -> Scores:
        """Every candidate's log-probability after the input; one engine request per candidate."""
        sinks, results = self.result_sinks(len(request.candidates))
        prepared = await asyncio.to_thread(plan_score, request, self.backbone, self.store, self.limits, sinks)
        answers = await self.run_all(prepared, results)
        return scores(request.candidates, answers, prepared[0].num_input_tokens)

    def result_sinks(
        self, count: int
    ) -> tuple[list[Callable[[EngineOutput], None]], list[asyncio.Queue[EngineOutput]]]:
        """One queue per engine request, filled from the engine thread."""
        if not self.is_ready():
            raise EngineUnavailable("the engine is not running")
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue[EngineOutput]] = [asyncio.Queue() for _ in range(count)]
        return [self.outbox.sink(loop, events) for events in queues], queues

    async def run_all(self, requests: list[Request], queues: list[asyncio.Queue[EngineOutput]]) -> list[Results]:
        """Hand the requests to the engine in one command (so they join the same step), then collect each one's row
        results; the first error fails the call and the others are aborted."""
        self.send(partial(self.engine.add_all, requests), *requests)
        results: list[Results] = [{} for _ in requests]
        pending = set(range(len(requests)))
        try:
            for i, events in enumerate(queues):
                while i in pending:
                    event = await self.next_event(events)
                    if event.error is not None:
                        raise event.error
                    results[i].update({result.row: result for result in event.results})
                    if event.finished:
                        pending.discard(i)
        finally:
            for i in pending:
                self.send(partial(self.engine.abort, requests[i].request_id))
        return results

    async def next_event(self, events: asyncio.Queue[EngineOutput]) -> EngineOutput:
        """A request's next output, or EngineUnavailable once the engine thread has stopped: it answers every
        request it holds as it stops, but a command that reached the inbox after its last look is never run."""
        while True:
            if not events.empty():  # the common case, without a timer
                return events.get_nowait()
            try:
                async with asyncio.timeout(LIVENESS_CHECK_S):  # not wait_for: on 3.11 it loses a cancellation
                    return await events.get()  # that comes with an output (the caller's abort never sent)
            except TimeoutError:
                if not self.thread.is_alive() and events.empty():
                    raise EngineUnavailable("the engine stopped before it answered this request") from None

    async def prompt_logprobs(self, request: PromptScoreInput) -> tuple[PromptToken | None, ...]:
        """Every prompt token's log-probability after the ones before it (the first: None)."""
        sinks, queues = self.result_sinks(1)
        prepared = await asyncio.to_thread(plan_prompt_score, request, self.backbone, self.store, self.limits, sinks[0])
        if prepared is None:
            return prompt_tokens(self.backbone, request.token_ids, None)
        answers = await self.run_all([prepared], queues)
        return prompt_tokens(self.backbone, request.token_ids, answers[0][0])

    # ---- the tokenizer (vLLM's /tokenize, /detokenize, /tokenizer_info)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backbone.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def detokenize(self, token_ids: list[int]) -> str:
        check_token_ids(self.backbone, token_ids, "tokens")
        return str(self.backbone.tokenizer.decode(token_ids))

    def tokenizer_info(self) -> TokenizerInfo:
        tokenizer = self.backbone.tokenizer
        max_len = self.backbone.max_positions or self.limits.max_input_tokens + self.limits.max_new_tokens
        return TokenizerInfo(
            tokenizer_class=type(tokenizer).__name__,
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
            pad_token=tokenizer.pad_token,
            unk_token=tokenizer.unk_token,
            chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
            model_max_length=max_len,
            vocab_size=self.backbone.num_token_ids,
        )

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        self.backbone.kind.check_generation("chat completions", self.backbone.model_id)  # before its chat template
        return render_chat(self.backbone.tokenizer, messages)

    # ---- tasks

    def register_task(
        self, task_id: str, adapter_config: bytes, adapter_model: bytes, labels: bytes | None = None
    ) -> tuple[TaskRecord, bool]:
        """Validate, run once on the engine (a task that cannot answer is refused), then store durably."""
        self.probe(self.store.validate(task_id, adapter_config, adapter_model, labels))
        return self.store.register(task_id, adapter_config, adapter_model, labels)

    def probe(self, artifact: TaskArtifact) -> None:
        """Blocking (a caller's thread): the engine thread runs the probe rows; their task leaves the device with
        them (see probe.PROBE_TASK_ID)."""
        if not self.is_ready():
            raise EngineUnavailable("the engine is not running")
        probe = Probe.of(artifact, self.backbone, self.config.cache_prompt_kv)
        for request in probe.requests:
            self.send(partial(self.engine.probe, request), request)
        finished = probe.wait(self.is_ready)
        for request in probe.requests:
            self.send(partial(self.engine.abort, request.request_id))  # a no-op once finished
        probe.verdict(artifact, finished, self.backbone)

    def delete_task(self, task_id: str) -> None:
        self.store.delete(task_id)

    def list_tasks(self) -> list[TaskRecord]:
        return self.store.list()

    def get_task(self, task_id: str) -> TaskRecord:
        return self.store.get(task_id)

    def on_store_event(self, event: StoreEvent) -> None:
        """Old versions leave the device cache once no running row holds them."""
        keep = event.version if event.kind == "registered" else None
        self.send(partial(self.engine.retire_task, event.task_id, keep))

    # ---- observation (read from other threads; plain ints, no locks needed)

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        self.engine.step_listeners.append(listener)

    def info(self) -> EngineInfo:
        fp = self.backbone.fingerprint
        return EngineInfo(
            model_id=self.backbone.model_id,
            model_type=fp.model_type,
            dtype=str(self.backbone.dtype).removeprefix("torch."),
            device=str(self.backbone.device),
            hidden_size=fp.hidden_size,
            num_layers=fp.num_layers,
            num_key_value_heads=fp.num_key_value_heads,
            head_dim=fp.head_dim,
            vocab_size=fp.vocab_size,
            max_batch_size=self.config.max_batch_size,
            max_batch_tokens=self.engine.scheduler.config.max_step_tokens,
            max_virtual_tokens=self.config.max_virtual_tokens,
            max_lora_rank=self.config.max_lora_rank,
            version=__version__,
            num_tasks=len(self.store),
            kv_cache_tokens=self.engine.memory.num_blocks * self.engine.memory.block_size,
            kv_block_size=self.engine.memory.block_size,
            model_kind=self.backbone.kind.name,
            endpoints=endpoints(self.backbone),
            has_own_head=self.backbone.bare_head is not None,
        )

    def stats(self) -> EngineStats:
        engine, scheduler = self.engine, self.engine.scheduler
        memory, block_bytes = engine.memory, engine.pool.block_bytes
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            num_steps=engine.num_steps,
            num_tasks=len(self.store),
            cache=engine.tasks.stats(),
            last_step=engine.last_step,
            kv_cache_used_bytes=(memory.num_blocks - memory.num_free_blocks) * block_bytes,
            kv_cache_capacity_bytes=memory.num_blocks * block_bytes,
            num_preemptions=engine.num_preemptions,
            host_tasks=tuple(self.store.cached_keys()),
            host_adapters=self.store.cached_adapter_stats(),
            running_tasks=tasks_of(tuple(scheduler.running)),
            waiting_tasks=tasks_of(tuple(scheduler.waiting)),
        )


def tasks_of(requests: tuple[Request, ...]) -> tuple[str, ...]:
    """The distinct user tasks these requests' rows run under, in order of first appearance."""
    found = (row.task.key for request in requests for row in request.rows if row.task is not None)
    return tuple(dict.fromkeys(key[0] for key in found if is_user_task(key)))


def endpoints(backbone: Backbone) -> tuple[str, ...]:
    """The routes that apply to this backbone (the task routes always do)."""
    classification = ("/v1/classify",) if backbone.heads else ()
    return (*backbone.kind.generation_routes, *classification)


class Deliveries:
    """What one event loop gets from a step, in the order the engine gave it: each output with its request's queue;
    a one-row request's token comes as values (`put_token`'s, by column), made into its output on the loop."""

    __slots__ = ("finish_reasons", "logprobs", "outputs", "queues", "request_ids", "rows", "token_ids", "tops")

    def __init__(self) -> None:
        self.queues: list[asyncio.Queue[EngineOutput]] = []
        self.outputs: list[EngineOutput | None] = []  # None: the next token of the columns below
        self.request_ids: list[str] = []
        self.rows: list[int] = []
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.finish_reasons: list[FinishReason | None] = []
        self.tops: list[tuple[tuple[int, float], ...]] = []

    def __len__(self) -> int:
        return len(self.queues)


class QueueSink(TokenSink):
    """A request's sink into its caller's queue: its outputs wait in the outbox for the step's hand-off. One whose
    loop has closed raises at once, so the engine drops that request alone (its caller is gone)."""

    __slots__ = ("events", "loop", "outbox")

    def __init__(self, outbox: Outbox, loop: asyncio.AbstractEventLoop, events: asyncio.Queue[EngineOutput]) -> None:
        self.outbox = outbox
        self.loop = loop
        self.events = events

    def __call__(self, output: EngineOutput) -> None:
        deliveries = self.deliveries()
        deliveries.queues.append(self.events)
        deliveries.outputs.append(output)

    def put_token(
        self, request_id: str, row: int, token_id: int, logprob: float, finish_reason: FinishReason | None,
        top: tuple[tuple[int, float], ...],
    ) -> None:  # fmt: skip
        deliveries = self.outbox.pending.get(self.loop)  # `deliveries()` inline: this is called for every token
        if deliveries is None or self.loop.is_closed():
            deliveries = self.deliveries()
        deliveries.queues.append(self.events)
        deliveries.outputs.append(None)
        deliveries.request_ids.append(request_id)
        deliveries.rows.append(row)
        deliveries.token_ids.append(token_id)
        deliveries.logprobs.append(logprob)
        deliveries.finish_reasons.append(finish_reason)
        deliveries.tops.append(top)

    def deliveries(self) -> Deliveries:
        if self.loop.is_closed():
            raise RuntimeError("Event loop is closed")
        deliveries = self.outbox.pending.get(self.loop)
        if deliveries is None:
            deliveries = self.outbox.pending[self.loop] = Deliveries()
        return deliveries


class Outbox:
    """The outputs the engine thread has for each event loop, handed over once per step (engine thread only)."""

    def __init__(self) -> None:
        self.pending: dict[asyncio.AbstractEventLoop, Deliveries] = {}

    def sink(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue[EngineOutput]) -> QueueSink:
        return QueueSink(self, loop, events)

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for loop, deliveries in pending.items():
            try:
                loop.call_soon_threadsafe(deliver_all, deliveries)
            except RuntimeError as error:  # closed since its requests' outputs were put: their callers are gone
                logger.warning("%d outputs for a closed event loop dropped (%s)", len(deliveries), error)


def deliver_all(deliveries: Deliveries) -> None:
    """On the callers' loop: each output into its request's queue, a token given as values made into its output
    here."""
    tokens = zip(deliveries.request_ids, deliveries.rows, deliveries.token_ids, deliveries.logprobs,
                 deliveries.finish_reasons, deliveries.tops, strict=True)  # fmt: skip
    for events, output in zip(deliveries.queues, deliveries.outputs, strict=True):
        if output is None:
            request_id, row, token_id, logprob, finish_reason, top = next(tokens)
            token = RowToken(row, token_id, logprob, finish_reason, top)
            output = EngineOutput(request_id, (token,), finish_reason is not None)
        events.put_nowait(output)


def run_command(engine: Engine, command: Command) -> None:
    """One inbox command; a failing one fails the requests it carried (their callers get the error, not a wait) and
    the loop goes on."""
    try:
        command.run()
    except Exception as error:
        logger.exception("engine command failed; failing the %d request(s) it carried", len(command.requests))
        engine.refuse(list(command.requests), GenerationFailed(f"the engine could not take the request: {error}"))


def build_engine(config: EngineConfig) -> AsyncEngine:
    """Load the backbone, open the store, start the engine thread (blocking: call it off the event loop)."""
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    backbone = load_backbone(config.model, config.device, config.dtype, config.trust_remote_code, config.cpu_linears)
    limits = StoreLimits(config.max_virtual_tokens, config.max_config_bytes, config.max_adapter_bytes,
                         config.max_lora_rank)  # fmt: skip
    timeouts = StoreTimeouts(config.store_connect_timeout_s, config.store_read_timeout_s)
    store = TaskStore(config.store_dir, backbone.fingerprint, limits, max_cached_adapters=config.num_cpu_loras,
                      timeouts=timeouts)  # fmt: skip
    core = Engine(backbone, config)
    if config.self_check:
        self_check(core)
    engine = AsyncEngine(core, store, config)
    engine.start()
    freeze_startup_heap()
    logger.info("engine ready: %s, %d tasks registered", backbone.model_id, len(store))
    return engine


def freeze_startup_heap() -> None:
    """What start-up made and keeps (the model's modules, torch's and transformers' own objects: some 400,000 with
    the built-in backbone) moves to the garbage collector's permanent generation, so that no full collection walks it
    again while serving: one took 230 ms of the engine thread's time (the GIL held throughout) against 8 ms frozen.
    Garbage is collected first, so none is kept (vLLM's freeze_gc_heap does the same); `AsyncEngine.shutdown` undoes
    it."""
    gc.collect()
    gc.freeze()
