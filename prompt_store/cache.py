"""The device-side prompt cache: materialised tasks keyed by (task_id, version), LRU within a byte budget.

Used only from the engine thread. Entries held by running rows (ref_count > 0) or pinned are never evicted;
when everything is held the cache runs over budget and shrinks again as soon as something is released.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prompt_store.materialize import materialize
from prompt_store.types import BackboneFingerprint, CacheStats, DeviceTask, TaskArtifact, TaskKey

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class CacheEntry:
    task: DeviceTask
    ref_count: int = 0
    is_pinned: bool = False
    is_retired: bool = False  # a newer version or a delete superseded it: freed on its last release

    @property
    def is_evictable(self) -> bool:
        return self.ref_count == 0 and not self.is_pinned


class PromptCache:
    def __init__(
        self,
        fingerprint: BackboneFingerprint,
        device: torch.device | str,
        dtype: torch.dtype,
        budget_bytes: int,
        prepare: Callable[[DeviceTask], DeviceTask] | None = None,
    ) -> None:
        """`prepare` runs once on each task materialised (the engine turns prompts into their keys and values)."""
        self.fingerprint = fingerprint
        self.prepare = prepare
        self.device = torch.device(device)
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self.entries: OrderedDict[TaskKey, CacheEntry] = OrderedDict()  # least recently used first
        self.resident_bytes = 0
        self.num_hits = 0
        self.num_misses = 0
        self.num_evictions = 0

    def acquire(self, artifact: TaskArtifact) -> DeviceTask:
        """The device tensors of a task version, held until `release`; materialised on a miss."""
        entry = self.entries.get(artifact.key)
        if entry is None:
            self.num_misses += 1
            entry = self._insert(artifact)
        else:
            self.num_hits += 1
            self.entries.move_to_end(artifact.key)
        entry.ref_count += 1
        self._evict_to_budget()
        return entry.task

    def release(self, key: TaskKey) -> None:
        entry = self.entries.get(key)
        if entry is None or entry.ref_count == 0:
            raise ValueError(f"release of {key}: expected a reference held by acquire; found none")
        entry.ref_count -= 1
        if entry.ref_count == 0 and entry.is_retired:
            self._free(key)
        self._evict_to_budget()

    def pin(self, artifact: TaskArtifact) -> None:
        """Keep a task resident regardless of use (e.g. a hot task); retire or unpin lets it go."""
        entry = self.entries.get(artifact.key) or self._insert(artifact)
        entry.is_pinned = True
        self._evict_to_budget()

    def unpin(self, key: TaskKey) -> None:
        entry = self.entries.get(key)
        if entry is None:
            return  # already freed, e.g. retired
        entry.is_pinned = False
        self._evict_to_budget()

    def retire(self, task_id: str, keep_version: int | None) -> None:
        """Free every version except `keep_version` (None: all) now, or on its last release if in use."""
        for key in [key for key in self.entries if key[0] == task_id and key[1] != keep_version]:
            entry = self.entries[key]
            entry.is_retired, entry.is_pinned = True, False
            if entry.ref_count == 0:
                self._free(key)

    def ref_count(self, key: TaskKey) -> int:
        entry = self.entries.get(key)
        return entry.ref_count if entry else 0

    def num_refs(self) -> int:
        return sum(entry.ref_count for entry in self.entries.values())

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self.num_hits,
            misses=self.num_misses,
            evictions=self.num_evictions,
            resident_bytes=self.resident_bytes,
            num_entries=len(self.entries),
            num_pinned=sum(entry.is_pinned for entry in self.entries.values()),
        )

    def _insert(self, artifact: TaskArtifact) -> CacheEntry:
        task = materialize(artifact, self.fingerprint, self.device, self.dtype)
        entry = CacheEntry(self.prepare(task) if self.prepare else task)
        self.entries[artifact.key] = entry
        self.resident_bytes += entry.task.nbytes
        return entry

    def _free(self, key: TaskKey) -> None:
        entry = self.entries.pop(key)
        self.resident_bytes -= entry.task.nbytes

    def _evict_to_budget(self) -> None:
        if self.resident_bytes <= self.budget_bytes:
            return
        for key in [key for key, entry in self.entries.items() if entry.is_evictable]:
            self._free(key)
            self.num_evictions += 1
            if self.resident_bytes <= self.budget_bytes:
                return
        logger.debug(
            "prompt cache over budget: %d of %d bytes held by running rows", self.resident_bytes, self.budget_bytes
        )
