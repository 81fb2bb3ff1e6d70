"""Which blocks of the KV pool hold what, in plain Python (no torch): rows' own blocks and tasks' shared blocks.

A block holds `block_size` consecutive tokens' keys and values in every layer. Blocks 1..num_blocks are handed
out; block 0 of the pool is never written, and attention pads with it (a masked column read there is zero, where a
row's stale or non-finite values could poison the softmax). A row owns the blocks of its own tokens. A task
version's virtual tokens live in blocks of their own, held once however many rows use them and counted by
reference: a task used by no running row stays resident (least recently used first) until its blocks are needed,
and is never evicted while a row holds it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from prompt_store.types import TaskKey


@dataclass(slots=True)
class TaskBlocks:
    """The pool blocks of one task version's virtual tokens."""

    key: TaskKey
    num_tokens: int
    block_ids: list[int]
    ref_count: int = 0
    is_filled: bool = False  # the engine has written the task's keys and values into the blocks
    is_retired: bool = False  # a newer version or a delete superseded it: freed on its last release


@dataclass
class KVMemory:
    num_blocks: int
    block_size: int
    free: list[int] = field(init=False)
    tasks: OrderedDict[TaskKey, TaskBlocks] = field(init=False)  # least recently used first
    kept_version: dict[str, float] = field(init=False)  # per task id: older versions are retired (inf: all)
    num_evictions: int = 0
    evicted: list[TaskKey] = field(default_factory=list)  # since the last take_evicted, for per-task metrics

    def __post_init__(self) -> None:
        self.free = list(range(self.num_blocks, 0, -1))  # a stack: block 1 is handed out first
        self.tasks = OrderedDict()
        self.kept_version = {}

    # ---- counting

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_evictable_blocks(self) -> int:
        return sum(len(task.block_ids) for task in self.tasks.values() if task.ref_count == 0)

    @property
    def num_available_blocks(self) -> int:
        """Free now, or once unused tasks are evicted."""
        return self.num_free_blocks + self.num_evictable_blocks

    def task_blocks_needed(self, keys: dict[TaskKey, int]) -> int:
        """Blocks that holding these tasks (key -> virtual tokens) would take from the available ones: a new task's
        blocks, and a resident unused task's (it stops being evictable)."""
        needed = 0
        for key, num_tokens in keys.items():
            task = self.tasks.get(key)
            if task is None:
                needed += self.blocks_for(num_tokens)
            elif task.ref_count == 0:
                needed += len(task.block_ids)
        return needed

    def num_task_refs(self) -> int:
        return sum(task.ref_count for task in self.tasks.values())

    def is_superseded(self, key: TaskKey) -> bool:
        """A newer version was registered, or the task deleted, since requests for this version were built."""
        return key[1] < self.kept_version.get(key[0], 0)

    # ---- rows' own blocks

    def allocate(self, num_blocks: int) -> list[int]:
        """`num_blocks` blocks, evicting unused tasks as needed; the caller checked `num_available_blocks`."""
        while len(self.free) < num_blocks:
            self.evict_one()
        return [self.free.pop() for _ in range(num_blocks)]

    def release(self, block_ids: list[int]) -> None:
        self.free.extend(reversed(block_ids))

    # ---- tasks' shared blocks

    def hold_task(self, key: TaskKey, num_tokens: int) -> TaskBlocks:
        """A reference to the task's blocks, allocated (unfilled) on first use."""
        task = self.tasks.get(key)
        if task is None:
            task = TaskBlocks(key, num_tokens, [], is_retired=self.is_superseded(key))
            task.ref_count = 1  # protects it from eviction while its own blocks are allocated
            task.block_ids = self.allocate(self.blocks_for(num_tokens))
            self.tasks[key] = task
            return task
        task.ref_count += 1
        self.tasks.move_to_end(key)
        return task

    def release_task(self, key: TaskKey) -> None:
        task = self.tasks.get(key)
        if task is None or task.ref_count == 0:
            raise ValueError(f"release of task {key}: expected a reference held by hold_task; found none")
        task.ref_count -= 1
        if task.ref_count == 0 and task.is_retired:
            self.drop_task(key)

    def retire(self, task_id: str, keep_version: int | None) -> None:
        """Free every version of the task except `keep_version` (None: all) now, or on its last release."""
        self.kept_version[task_id] = float("inf") if keep_version is None else keep_version
        for key in [key for key in self.tasks if key[0] == task_id and key[1] != keep_version]:
            task = self.tasks[key]
            task.is_retired = True
            if task.ref_count == 0:
                self.drop_task(key)

    def evict_one(self) -> None:
        key = next((key for key, task in self.tasks.items() if task.ref_count == 0), None)
        if key is None:
            raise MemoryError("the KV pool is full and every resident task is in use")
        self.drop_task(key)
        self.num_evictions += 1
        self.evicted.append(key)

    def take_evicted(self) -> list[TaskKey]:
        """The task versions evicted since the last call (the engine drains them once a step)."""
        evicted, self.evicted = self.evicted, []
        return evicted

    def drop_task(self, key: TaskKey) -> None:
        self.release(self.tasks.pop(key).block_ids)
