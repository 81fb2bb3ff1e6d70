"""What each step computes, in plain Python (no torch, no model): requests and block counts in, a plan out.

A step carries every running row's next token and, within the token budget, prefill chunks: the rest of rows
still prefilling, then new requests from the head of the queue (FIFO, so a large request is never starved by
small ones). A long input is split across steps; an arrival never stalls the running rows for a whole prefill
(an encoder-decoder row's encoder runs whole in the step that starts it and counts against the budget: one larger
than what is left waits for a step in which it is the first to start; so does an encoder's row, computed whole
because its tokens attend both ways). When the KV pool cannot hold the step,
the newest running requests are preempted: their blocks are freed and they wait at the head of the queue, to be
recomputed from their tokens (input and output so far) when they fit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from server.engine.adapter_slots import AdapterSlots
from server.engine.kv_memory import KVMemory
from server.engine.request import Request, Sequence, Status


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch_size: int  # rows running at once
    max_step_tokens: int  # tokens one step computes: the running rows' next tokens plus prefill chunks
    max_waiting: int  # bounded waiting queue


@dataclass(init=False, slots=True)
class Chunk:
    """`num_tokens` of a row's own tokens, from its first uncomputed one (`start`, when the chunk is made), computed
    in this step."""

    row: Sequence
    num_tokens: int
    start: int
    is_last: bool  # the chunk reaches the row's last token: the row is sampled after this step

    def __init__(self, row: Sequence, num_tokens: int) -> None:  # one call (a step makes one for every running row)
        self.row = row
        self.num_tokens = num_tokens
        self.start = row.num_computed
        self.is_last = self.start + num_tokens == row.num_fixed_tokens + len(row.output_ids)


@dataclass(slots=True)
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    encoder_tokens: int = 0  # encoder-decoder rows starting this step: their encoders run in it too
    num_chunk_tokens: int = 0  # the chunks' tokens, kept as they are added (a sum per request is quadratic)

    @property
    def num_tokens(self) -> int:
        """What the step computes, against the token budget: the chunks' tokens and the starting encoders'."""
        return self.num_chunk_tokens + self.encoder_tokens

    def add(self, chunks: list[Chunk]) -> None:
        self.chunks += chunks
        self.num_chunk_tokens += sum([chunk.num_tokens for chunk in chunks])

    def drop(self, request: Request) -> None:
        """A preempted request's chunks leave the plan."""
        self.chunks = [chunk for chunk in self.chunks if chunk.row.request is not request]
        self.num_chunk_tokens = sum(chunk.num_tokens for chunk in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, memory: KVMemory, adapters: AdapterSlots | None = None) -> None:
        self.config = config
        self.memory = memory
        self.adapters = adapters or AdapterSlots()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is preempted first

    @property
    def num_running_rows(self) -> int:
        return sum(request.num_rows for request in self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def is_full(self) -> bool:
        return len(self.waiting) >= self.config.max_waiting

    def why_never_fits(self, request: Request) -> str | None:
        """Why the request could not run even alone, or None if it can."""
        if request.num_rows > self.config.max_batch_size:
            return f"the request needs {request.num_rows} batch rows; max_batch_size is {self.config.max_batch_size}"
        if request.is_lockstep and request.num_rows > self.config.max_step_tokens:
            return f"a mean ensemble of {request.num_rows} rows; max_batch_tokens is {self.config.max_step_tokens}"
        if (num_adapters := len(request.adapter_keys())) > self.adapters.max_loras:
            return f"the request applies {num_adapters} LoRA / IA3 tasks; max_loras is {self.adapters.max_loras}"
        # every task counted in full, resident or not: the answer must not depend on what else runs now
        blocks = sum(self.memory.blocks_for(num_tokens) for num_tokens in request.task_tokens().values())
        blocks += sum(self.memory.blocks_for(request.max_own_tokens(row)) for row in request.rows)
        if blocks > self.memory.num_blocks:
            size = self.memory.block_size
            return (
                f"the request needs {blocks * size} KV slots (per row virtual + input + max_new_tokens; an "
                f"encoder-decoder's the longer of its encoder input and its answer; in blocks of {size}); the KV "
                f"cache holds {self.memory.num_blocks * size}"
            )
        return None

    def add(self, request: Request) -> None:
        assert not self.is_full() and self.why_never_fits(request) is None
        self.waiting.append(request)

    def add_first(self, request: Request) -> None:
        """A request of the engine's own: at the head of the queue, whatever its length."""
        assert self.why_never_fits(request) is None
        self.waiting.appendleft(request)

    # ---- the plan

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        # decoding requests first (never more decode rows than the budget: each became one by a token of the step
        # before); their rows' next tokens are made in the pass that finds them, each row asked once a step
        decoding: list[Request] = []
        prefilling: list[Request] = []
        decode_chunks: list[Chunk] = []
        for request in self.running:
            first = len(decode_chunks)
            for row in request.rows:
                if row.finish_reason is None and not row.done:  # not row.is_finished (inline: asked of every row)
                    remaining = row.num_fixed_tokens + len(row.output_ids) - row.num_computed  # row.num_remaining
                    if remaining > 1:  # still prefilling: its rows are cut within the budget below
                        del decode_chunks[first:]
                        prefilling.append(request)
                        break
                    if remaining:
                        decode_chunks.append(Chunk(row, remaining))
            else:
                decoding.append(request)
        if not self.schedule_decoding(decode_chunks, plan):
            self.schedule_each(decoding, plan)
        self.schedule_each(prefilling, plan)
        if not plan.preempted:  # memory is short: admitting now would only preempt again
            self.admit_waiting(plan)
        return plan

    def schedule_decoding(self, chunks: list[Chunk], plan: StepPlan) -> bool:
        """Every decoding request's next tokens (`chunks`) at once, when the budget and the available blocks hold
        them all (the usual step): the plan `schedule_each` would make then, without its work per request. False:
        nothing done."""
        if len(chunks) > self.config.max_step_tokens - plan.num_tokens:
            return False  # a budget smaller than the decode rows: cut request by request
        growth = self.growth(chunks)
        needed = sum(num_blocks for _, num_blocks in growth)
        if needed and needed > self.memory.num_available_blocks:
            return False  # someone is preempted: request by request, newest first
        self.grow(growth)
        plan.add(chunks)
        return True

    def schedule_each(self, todo: list[Request], plan: StepPlan) -> None:
        for request in todo:
            if request.status is Status.RUNNING:  # not preempted by one before it
                self.schedule_running(request, plan)

    def schedule_running(self, request: Request, plan: StepPlan) -> None:
        chunks = self.chunks_for(request, self.config.max_step_tokens - plan.num_tokens)
        growth = self.growth(chunks)
        needed = sum(num_blocks for _, num_blocks in growth)  # a decode row needs a block once every block_size tokens
        while needed and needed > self.memory.num_available_blocks:
            victim = self.running[-1]
            self.preempt(victim, plan)
            if victim is request:
                return
        self.grow(growth)
        plan.add(chunks)

    def admit_waiting(self, plan: StepPlan) -> None:
        while self.waiting:
            request = self.waiting[0]
            if self.num_running_rows + request.num_rows > self.config.max_batch_size and not request.jumps_queue:
                return
            encoder = request.encoder_tokens
            if plan.admitted and plan.num_tokens + request.whole_tokens > self.config.max_step_tokens:
                return  # an encoder larger than what is left runs in a step of its own (beside the decode rows)
            budget = self.config.max_step_tokens - plan.num_tokens - encoder
            chunks = self.chunks_for(request, max(1, budget) if encoder else budget)  # a start token at least
            growth = self.growth(chunks)
            needed = self.memory.task_blocks_needed(request.task_tokens()) + sum(num_blocks for _, num_blocks in growth)
            if not chunks or needed > self.memory.num_available_blocks:
                return
            if not self.adapters.can_hold(request.adapter_keys()):
                return  # its LoRA / IA3 tasks wait for room among the max_loras held
            plan.encoder_tokens += encoder
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.running.append(request)
            for row in request.rows:
                if row.needs_task_blocks and row.task is not None:
                    row.task_blocks = self.memory.hold_task(row.task.key, row.num_virtual_tokens)
                if row.applies_adapter and row.task is not None and not row.is_finished:
                    self.adapters.hold(row.task.key)
                    row.holds_adapter = True
            self.grow(growth)
            plan.add(chunks)
            plan.admitted.append(request)

    def chunks_for(self, request: Request, budget: int) -> list[Chunk]:
        """The request's rows' next tokens within `budget`. A mean ensemble's rows are sampled together, so they
        reach their last token in the same step or none of them does."""
        rows = unfinished(request)
        leave = 0
        if request.is_lockstep and sum(remaining for _, remaining in rows) > budget:
            leave = 1
        whole = request.computes_rows_whole
        chunks = []
        for row, remaining in rows:
            num_tokens = remaining if whole else min(remaining - leave, budget)
            if num_tokens > 0:
                chunks.append(Chunk(row, num_tokens))
                budget -= num_tokens
        return chunks

    # ---- memory

    def growth(self, chunks: list[Chunk]) -> list[tuple[Sequence, int]]:
        """The chunks' rows that must add blocks to hold them, in order, each with how many (a step asks it of every
        running row; a decode row needs one once every block_size tokens, so the few that do are found first): a
        row's slots are its own tokens up to the chunk's last, or its encoder input if longer."""
        size = self.memory.block_size
        return [
            (c.row, -(-max(c.row.num_computed + c.num_tokens, c.row.encoder_length) // size) - len(c.row.block_ids))
            for c in chunks
            if c.row.num_computed + c.num_tokens > len(c.row.block_ids) * size
            or c.row.encoder_length > len(c.row.block_ids) * size
        ]

    def grow(self, growth: list[tuple[Sequence, int]]) -> None:
        for row, num_blocks in growth:
            row.block_ids += self.memory.allocate(num_blocks)

    def preempt(self, request: Request, plan: StepPlan) -> None:
        """Free the request's memory and put it back at the head of the queue, to be recomputed later."""
        self.running.remove(request)
        self.free(request)
        request.status = Status.WAITING
        self.waiting.appendleft(request)
        plan.drop(request)
        plan.preempted.append(request)

    def free(self, request: Request) -> None:
        for row in request.rows:
            self.free_row(row)

    def free_row(self, row: Sequence) -> None:
        """Give back the row's blocks and its hold on its task's blocks; its tokens stay."""
        self.memory.release(row.block_ids)
        row.block_ids, row.num_computed = [], 0
        if row.task_blocks is not None:
            self.memory.release_task(row.task_blocks.key)
            row.task_blocks = None
        if row.holds_adapter and row.task is not None:
            self.adapters.release(row.task.key)
            row.holds_adapter = False

    # ---- leaving

    def remove(self, request: Request) -> None:
        """A request left (finished, aborted or failed), wherever it was; its memory is freed."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.free(request)

    def find(self, request_id: str) -> Request | None:
        for request in (*self.running, *self.waiting):
            if request.request_id == request_id:
                return request
        return None


def unfinished(request: Request) -> list[tuple[Sequence, int]]:
    """The request's unfinished rows, each with its own tokens still to compute."""
    return [(row, row.num_remaining) for row in request.rows if not row.is_finished]
