"""Admission decisions in plain Python: ints and lists in, decisions out (no torch, no model)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Schedulable(Protocol):
    request_id: str

    @property
    def num_rows(self) -> int: ...

    @property
    def num_reserved_tokens(self) -> int: ...


R = TypeVar("R", bound=Schedulable)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch_size: int  # rows in the running batch
    max_batch_tokens: int  # KV slots reserved by the running batch (virtual + input + max new, per row)
    max_waiting: int  # bounded waiting queue
    prefill_split_tokens: int = 256  # see split_by_length


class Scheduler(Generic[R]):
    """FIFO: only the head of the queue is admitted, so a large request is never starved by small ones."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[R] = deque()
        self.running: list[R] = []

    @property
    def num_running_rows(self) -> int:
        return sum(request.num_rows for request in self.running)

    @property
    def num_reserved_tokens(self) -> int:
        return sum(request.num_reserved_tokens for request in self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def is_full(self) -> bool:
        return len(self.waiting) >= self.config.max_waiting

    def why_never_fits(self, request: R) -> str | None:
        """Why the request could not run even in an empty batch, or None if it can."""
        if request.num_rows > self.config.max_batch_size:
            return f"the request needs {request.num_rows} batch rows; max_batch_size is {self.config.max_batch_size}"
        if request.num_reserved_tokens > self.config.max_batch_tokens:
            return (
                f"the request needs {request.num_reserved_tokens} tokens (virtual + input + max_new_tokens, "
                f"per row); max_batch_tokens is {self.config.max_batch_tokens}"
            )
        return None

    def add(self, request: R) -> None:
        assert not self.is_full() and self.why_never_fits(request) is None
        self.waiting.append(request)

    def can_admit(self, request: R) -> bool:
        rows = self.num_running_rows + request.num_rows
        tokens = self.num_reserved_tokens + request.num_reserved_tokens
        return rows <= self.config.max_batch_size and tokens <= self.config.max_batch_tokens

    def schedule(self) -> list[R]:
        """Move waiting requests into the running set, head first, while they fit."""
        admitted: list[R] = []
        while self.waiting and self.can_admit(self.waiting[0]):
            request = self.waiting.popleft()
            self.running.append(request)
            admitted.append(request)
        return admitted

    def remove(self, request: R) -> None:
        """A request left (finished, aborted or failed), wherever it was."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def find(self, request_id: str) -> R | None:
        for request in (*self.running, *self.waiting):
            if request.request_id == request_id:
                return request
        return None


def split_by_length(sizes: list[tuple[int, int]], split_tokens: int) -> list[list[int]]:
    """Group admitted requests into prefill passes so that short inputs are not padded to the longest.

    `sizes[i]` is (rows, longest row's input positions) of request i; a request's rows stay together (an
    ensemble's members are sampled together). Requests are taken longest first; a new pass starts when the
    padding it saves, (width of the current pass - this length) x rows still to place, exceeds `split_tokens`:
    the price of one more forward pass, in positions. Returns passes of request indices, shortest pass first.
    """
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i][1])
    rows_left = sum(rows for rows, _ in sizes)
    passes: list[list[int]] = []
    width = 0
    for i in order:
        rows, length = sizes[i]
        if not passes or (width - length) * rows_left > split_tokens:
            passes.append([])
            width = length
        passes[-1].append(i)
        rows_left -= rows
    return passes[::-1]
