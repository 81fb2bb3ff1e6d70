"""The store's host tier: parsed CPU artifacts kept for repeated loads, so a load skips the store's reads.

Two shelves, each a thread-safe LRU: prompt-learning tasks (bounded by entries and bytes) and LoRA / IA3 tasks,
bounded by entries alone (vLLM's `max_cpu_loras`: a LoRA task the engine's device pool evicted loads again as a copy
to the device, not a read of its files and a validation against the backbone).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from prompt_store.types import HostCacheStats, TaskArtifact, TaskKey


class ArtifactLRU:
    def __init__(self, max_entries: int = 256, max_bytes: int | None = 256 * 1024 * 1024) -> None:
        """`max_bytes` None: bounded by entries alone."""
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self.num_hits = 0
        self.num_misses = 0
        self._entries: OrderedDict[TaskKey, TaskArtifact] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[TaskKey]:
        """The task versions held now, least recently used first (a snapshot: safe from any thread)."""
        with self._lock:
            return list(self._entries)

    def get(self, key: TaskKey) -> TaskArtifact | None:
        with self._lock:
            artifact = self._entries.get(key)
            if artifact is not None:
                self._entries.move_to_end(key)
            return artifact

    def put(self, artifact: TaskArtifact) -> None:
        with self._lock:
            self._pop(artifact.key)
            self._entries[artifact.key] = artifact
            self.num_bytes += artifact.nbytes
            while len(self._entries) > self.max_entries or (self.is_over_bytes and self._entries):
                self._pop(next(iter(self._entries)))

    @property
    def is_over_bytes(self) -> bool:
        return self.max_bytes is not None and self.num_bytes > self.max_bytes

    def discard(self, key: TaskKey) -> None:
        with self._lock:
            self._pop(key)

    def discard_task(self, task_id: str, keep_version: int | None = None) -> None:
        with self._lock:
            for key in [key for key in self._entries if key[0] == task_id and key[1] != keep_version]:
                self._pop(key)

    def count(self, is_hit: bool) -> None:
        with self._lock:
            if is_hit:
                self.num_hits += 1
            else:
                self.num_misses += 1

    def stats(self) -> HostCacheStats:
        with self._lock:
            return HostCacheStats(self.num_hits, self.num_misses, len(self._entries), self.num_bytes, self.max_entries)

    def _pop(self, key: TaskKey) -> None:
        artifact = self._entries.pop(key, None)
        if artifact is not None:
            self.num_bytes -= artifact.nbytes


class HostArtifacts:
    """Parsed artifacts on their shelf: LoRA / IA3 tasks (`max_adapters` of them) apart from prompt-learning tasks
    (`max_entries` within `max_bytes`), so neither kind pushes the other out."""

    def __init__(self, max_entries: int = 256, max_bytes: int = 256 * 1024 * 1024, max_adapters: int = 64) -> None:
        self.prompts = ArtifactLRU(max_entries, max_bytes)
        self.adapters = ArtifactLRU(max_adapters, None)

    def shelf(self, artifact: TaskArtifact) -> ArtifactLRU:
        return self.prompts if artifact.record.method.is_prompt_learning else self.adapters

    def load(self, key: TaskKey, read: Callable[[], TaskArtifact]) -> TaskArtifact:
        """The artifact held for `key`, else `read()` (kept for next time); each counts on its shelf."""
        for shelf in (self.prompts, self.adapters):
            artifact = shelf.get(key)
            if artifact is not None:
                shelf.count(is_hit=True)
                return artifact
        artifact = read()
        self.shelf(artifact).count(is_hit=False)
        self.put(artifact)
        return artifact

    def put(self, artifact: TaskArtifact) -> None:
        self.shelf(artifact).put(artifact)

    def discard(self, key: TaskKey) -> None:
        self.prompts.discard(key)
        self.adapters.discard(key)

    def discard_task(self, task_id: str) -> None:
        self.prompts.discard_task(task_id)
        self.adapters.discard_task(task_id)

    def keys(self) -> list[TaskKey]:
        return self.prompts.keys() + self.adapters.keys()
