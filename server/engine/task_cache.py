"""The device side of tasks, owned by the engine: each task version lives as keys and values in the KV pool, or as
input embeddings.

Prefix tasks always enter as keys and values. Prompt and P-tuning tasks do too when `prompts_as_kv` (the default):
their virtual tokens come first and attend only to each other, so the keys and values they leave are the same for
every input; computed once per task version into the pool, they are then shared by every row of the task like a
prefix. Otherwise a prompt row feeds the task's vectors as its first input embeddings (kept here, least recently
used first, within a byte budget). Which form a row's task takes is decided when the request is built
(`has_kv_prefix`) and never changes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from prompt_store.materialize import materialize
from prompt_store.types import CacheStats, Method, TaskArtifact, TaskKey
from server.engine.attention import one_row_kv, run_backbone
from server.engine.backbone import Backbone
from server.engine.kv_memory import KVMemory, TaskBlocks
from server.engine.kv_pool import KVPool, slots_of

logger = logging.getLogger(__name__)


def has_kv_prefix(method: Method, prompts_as_kv: bool) -> bool:
    return method.is_prefix or prompts_as_kv


class TaskCache:
    def __init__(self, backbone: Backbone, pool: KVPool, memory: KVMemory, embeddings_budget_bytes: int) -> None:
        self.backbone = backbone
        self.pool = pool
        self.memory = memory
        self.budget_bytes = embeddings_budget_bytes
        self.embeddings: OrderedDict[TaskKey, torch.Tensor] = OrderedDict()  # least recently used first
        self.num_hits = 0
        self.num_misses = 0
        self.num_evictions = 0

    def fill(self, blocks: TaskBlocks, artifact: TaskArtifact) -> None:
        """Write the task's virtual tokens' keys and values into its blocks, unless they are there already."""
        if blocks.is_filled:
            self.num_hits += 1
            return
        self.num_misses += 1
        task = materialize(artifact, self.backbone.fingerprint, self.backbone.device, self.backbone.dtype)
        slots = slots_of(blocks.block_ids, blocks.num_tokens, self.pool.block_size).to(self.backbone.device)
        if task.prompt_embeds is not None:
            self.compute_prompt_kv(task.prompt_embeds, slots)
        else:
            self.pool.write(slots, task.prefix_keys, task.prefix_values)
        blocks.is_filled = True

    @torch.inference_mode()
    def compute_prompt_kv(self, prompt_embeds: torch.Tensor, slots: torch.Tensor) -> None:
        """Run the virtual tokens [P, H] alone, as a row's first P tokens: their keys and values land in `slots`."""
        kv = one_row_kv(self.pool.keys, self.pool.values, slots)
        positions = torch.arange(slots.shape[0], device=slots.device)[None]
        run_backbone(self.backbone.model, kv, inputs_embeds=prompt_embeds[None], position_ids=positions)

    def embeddings_of(self, artifact: TaskArtifact) -> torch.Tensor:
        """[P, H]: a prompt task's vectors, for rows that feed them as input embeddings."""
        embeds = self.embeddings.get(artifact.key)
        if embeds is not None:
            self.num_hits += 1
            self.embeddings.move_to_end(artifact.key)
            return embeds
        self.num_misses += 1
        task = materialize(artifact, self.backbone.fingerprint, self.backbone.device, self.backbone.dtype)
        assert task.prompt_embeds is not None, "prefix tasks always enter as keys and values"
        if not self.memory.is_superseded(artifact.key):  # a retired version serves its last rows, uncached
            self.embeddings[artifact.key] = task.prompt_embeds
            self.evict_to_budget()
        return task.prompt_embeds

    def evict_to_budget(self) -> None:
        """Rows running on an evicted task keep its tensor alive; a later row materialises it again."""
        while self.embeddings_bytes > self.budget_bytes and len(self.embeddings) > 1:
            self.embeddings.popitem(last=False)
            self.num_evictions += 1

    @property
    def embeddings_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.embeddings.values())

    def retire(self, task_id: str, keep_version: int | None) -> None:
        """Free every version of the task but `keep_version` (None: all); keys and values in use go on their last
        release."""
        self.memory.retire(task_id, keep_version)
        for key in [key for key in self.embeddings if key[0] == task_id and key[1] != keep_version]:
            del self.embeddings[key]

    def stats(self) -> CacheStats:
        """Read from other threads (metrics): each dict is copied in one C call, which holds the GIL throughout."""
        tasks, embeddings = list(self.memory.tasks.values()), list(self.embeddings.values())
        task_bytes = sum(len(task.block_ids) for task in tasks) * self.pool.block_bytes
        return CacheStats(
            hits=self.num_hits,
            misses=self.num_misses,
            evictions=self.num_evictions + self.memory.num_evictions,
            resident_bytes=sum(t.numel() * t.element_size() for t in embeddings) + task_bytes,
            num_entries=len(embeddings) + len(tasks),
            num_pinned=sum(task.ref_count > 0 for task in tasks),
        )
