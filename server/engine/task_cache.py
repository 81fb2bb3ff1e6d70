"""The device side of tasks, owned by the engine: each task version lives as keys and values in the KV pool, or as
input embeddings.

Prefix tasks always enter as keys and values. Prompt and P-tuning tasks do too when `prompts_as_kv` (the default):
their virtual tokens come first and attend only to each other, so the keys and values they leave are the same for
every input; computed once per task version into the pool, they are then shared by every row of the task like a
prefix. Otherwise a prompt row feeds the task's vectors as its first input embeddings (kept here, least recently
used first, within a byte budget). Which form a row's task takes is decided when the request is built
(the backbone kind's `has_kv_prefix`) and never changes. LoRA and IA3 tasks live as their modules' weights in the
adapter pool (adapters.py), under the same hit, load and eviction counts.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import torch

from prompt_store.adapter import is_valid_task_id
from prompt_store.materialize import materialize
from prompt_store.types import CacheStats, TaskArtifact, TaskKey, nbytes
from server.engine.adapter_slots import AdapterSlots
from server.engine.adapters import AdapterCache, AdapterHooks, DeviceAdapter
from server.engine.attention import one_row_kv, run_backbone
from server.engine.backbone import Backbone
from server.engine.kv_memory import KVMemory, TaskBlocks
from server.engine.kv_pool import KVPool, slots_of
from server.engine.types import TaskCacheEvents, TaskLoad

logger = logging.getLogger(__name__)


def is_user_task(key: TaskKey) -> bool:
    """The engine's own tasks (a registration's probe, the self-check) have ids the task-id pattern refuses."""
    return is_valid_task_id(key[0])


class TaskCache:
    def __init__(
        self,
        backbone: Backbone,
        pool: KVPool,
        memory: KVMemory,
        embeddings_budget_bytes: int,
        adapter_slots: AdapterSlots | None = None,
        adapter_budget_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.backbone = backbone
        self.pool = pool
        self.memory = memory
        self.budget_bytes = embeddings_budget_bytes
        self.adapters = AdapterCache(
            AdapterHooks(backbone.modules), adapter_slots or AdapterSlots(), adapter_budget_bytes
        )
        self.embeddings: OrderedDict[TaskKey, torch.Tensor] = OrderedDict()  # least recently used first
        self.heads: OrderedDict[TaskKey, dict[str, torch.Tensor]] = OrderedDict()  # classification heads, LRU
        self.num_hits = 0
        self.num_misses = 0
        self.num_evictions = 0
        # since the last take_events (once a step): what per-task metrics are made of
        self.hits: list[TaskKey] = []
        self.loads: list[TaskLoad] = []
        self.evicted: list[TaskKey] = []

    def fill(self, blocks: TaskBlocks, artifact: TaskArtifact) -> None:
        """Write the task's virtual tokens' keys and values into its blocks, unless they are there already."""
        if blocks.is_filled:
            self.record_hit(artifact.key)
            return
        self.num_misses += 1
        started = time.perf_counter()
        task = materialize(artifact, self.backbone.fingerprint, self.backbone.device, self.backbone.dtype)
        slots = slots_of(blocks.block_ids, blocks.num_tokens, self.pool.block_size).to(self.backbone.device)
        if task.prompt_embeds is not None:
            self.compute_prompt_kv(task.prompt_embeds, slots)
        else:
            self.pool.write(slots, task.prefix_keys, task.prefix_values)
        blocks.is_filled = True
        self.record_load(artifact.key, started)

    def record_hit(self, key: TaskKey) -> None:
        self.num_hits += 1
        self.hits.append(key)

    def record_load(self, key: TaskKey, started: float) -> None:
        """A load's time includes its device work: on a GPU, where kernels run asynchronously, wait for it (a miss
        is rare, and the step waits for the device at its end anyway)."""
        if self.backbone.device.type == "cuda":
            torch.cuda.synchronize(self.backbone.device)
        self.loads.append(TaskLoad(key, time.perf_counter() - started))

    @torch.inference_mode()
    def compute_prompt_kv(self, prompt_embeds: torch.Tensor, slots: torch.Tensor) -> None:
        """Run the virtual tokens [P, H] alone, as a row's first P tokens: their keys and values land in `slots`."""
        kv = one_row_kv(self.pool.keys, self.pool.values, slots)
        positions = torch.arange(slots.shape[0], device=slots.device)[None]
        run_backbone(self.backbone.model, kv, inputs_embeds=prompt_embeds[None], position_ids=positions)

    def adapter_of(self, artifact: TaskArtifact) -> DeviceAdapter:
        """A LoRA or IA3 task's weights on the device (loaded into the adapter pool on a miss)."""
        adapter = self.adapters.get(artifact.key)
        if adapter is not None:
            self.record_hit(artifact.key)
            return adapter
        self.num_misses += 1
        started = time.perf_counter()
        adapter = DeviceAdapter.of(artifact, self.backbone.device, self.backbone.dtype)
        adapter.is_retired = self.memory.is_superseded(artifact.key)  # a probe's, or a retired version's last rows
        self.adapters.add(adapter)
        self.record_load(artifact.key, started)
        return adapter

    def embeddings_of(self, artifact: TaskArtifact) -> torch.Tensor:
        """[P, H]: a prompt task's vectors, for rows that feed them as input embeddings."""
        embeds = self.embeddings.get(artifact.key)
        if embeds is not None:
            self.record_hit(artifact.key)
            self.embeddings.move_to_end(artifact.key)
            return embeds
        self.num_misses += 1
        started = time.perf_counter()
        task = materialize(artifact, self.backbone.fingerprint, self.backbone.device, self.backbone.dtype)
        assert task.prompt_embeds is not None, "prefix tasks always enter as keys and values"
        self.record_load(artifact.key, started)
        if not self.memory.is_superseded(artifact.key):  # a retired version serves its last rows, uncached
            self.embeddings[artifact.key] = task.prompt_embeds
            self.evict_to_budget()
        return task.prompt_embeds

    def head_of(self, artifact: TaskArtifact) -> dict[str, torch.Tensor]:
        """A classification task's head tensors on the device, in the backbone's dtype (kept, least recently used
        first, within the same byte budget as prompt vectors)."""
        head = self.heads.get(artifact.key)
        if head is not None:
            self.heads.move_to_end(artifact.key)
            return head
        dtype, device = self.backbone.dtype, self.backbone.device
        head = {name: tensor.to(device=device, dtype=dtype) for name, tensor in artifact.head.items()}
        if not self.memory.is_superseded(artifact.key):
            self.heads[artifact.key] = head
            while sum(nbytes(h.values()) for h in self.heads.values()) > self.budget_bytes and len(self.heads) > 1:
                self.heads.popitem(last=False)
        return head

    def evict_to_budget(self) -> None:
        """Rows running on an evicted task keep its tensor alive; a later row materialises it again."""
        while self.embeddings_bytes > self.budget_bytes and len(self.embeddings) > 1:
            key, _ = self.embeddings.popitem(last=False)
            self.num_evictions += 1
            self.evicted.append(key)

    @property
    def embeddings_bytes(self) -> int:
        return nbytes(self.embeddings.values())

    def retire(self, task_id: str, keep_version: int | None) -> None:
        """Free every version of the task but `keep_version` (None: all); keys and values in use go on their last
        release."""
        self.memory.retire(task_id, keep_version)
        self.adapters.retire(task_id, keep_version)
        for key in [key for key in self.embeddings if key[0] == task_id and key[1] != keep_version]:
            del self.embeddings[key]
        for key in [key for key in self.heads if key[0] == task_id and key[1] != keep_version]:
            del self.heads[key]

    def take_events(self) -> TaskCacheEvents:
        """The users' tasks' hits, loads and evictions since the last call (the engine takes them once a step)."""
        hits, loads = self.hits, self.loads
        evicted = self.evicted + self.memory.take_evicted() + self.adapters.evicted
        self.hits, self.loads, self.evicted, self.adapters.evicted = [], [], [], []
        return TaskCacheEvents(
            hits=tuple(filter(is_user_task, hits)),
            loads=tuple(load for load in loads if is_user_task(load.key)),
            evictions=tuple(filter(is_user_task, evicted)),
        )

    def stats(self) -> CacheStats:
        """Read from other threads (metrics): each dict is copied in one C call, which holds the GIL throughout."""
        tasks, embeddings = list(self.memory.tasks.values()), list(self.embeddings.items())
        adapters, held = list(self.adapters.resident.values()), set(self.adapters.slots.holds)
        adapter_bytes = sum(a.nbytes for a in adapters) + self.adapters.hooks.stacked_bytes  # stacks: running tasks'
        task_bytes = sum(len(task.block_ids) for task in tasks) * self.pool.block_bytes
        resident = {task.key for task in tasks if task.is_filled} | {key for key, _ in embeddings}
        resident |= {adapter.key for adapter in adapters}
        return CacheStats(
            hits=self.num_hits,
            misses=self.num_misses,
            evictions=self.num_evictions + self.memory.num_evictions + self.adapters.num_evictions,
            resident_bytes=nbytes(t for _, t in embeddings) + task_bytes + adapter_bytes,
            num_entries=len(embeddings) + len(tasks) + len(adapters),
            num_pinned=sum(task.ref_count > 0 for task in tasks) + sum(a.key in held for a in adapters),
            resident_tasks=tuple(sorted(filter(is_user_task, resident))),
            max_resident_tasks=self.max_resident_tasks([len(task.block_ids) for task in tasks]) + len(embeddings),
            adapter_bytes=adapter_bytes,
            num_adapters=len(adapters),
            adapter_capacity_bytes=self.adapters.budget_bytes,
        )

    def max_resident_tasks(self, task_blocks: list[int]) -> int:
        """About how many tasks the KV pool holds at once: its blocks over the resident tasks' mean blocks (a task
        takes one at least); rows take blocks too, and idle tasks make room for them, so this is a ceiling."""
        mean_blocks = -(-sum(task_blocks) // len(task_blocks)) if task_blocks else 1
        return self.memory.num_blocks // max(1, mean_blocks)
