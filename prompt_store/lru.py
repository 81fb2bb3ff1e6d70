"""A small thread-safe LRU of CPU artifacts, bounded by entries and bytes, so repeated loads skip the disk."""

from __future__ import annotations

import threading
from collections import OrderedDict

from prompt_store.types import TaskArtifact, TaskKey


class ArtifactLRU:
    def __init__(self, max_entries: int = 256, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.num_bytes = 0
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
            while len(self._entries) > self.max_entries or (self.num_bytes > self.max_bytes and self._entries):
                self._pop(next(iter(self._entries)))

    def discard(self, key: TaskKey) -> None:
        with self._lock:
            self._pop(key)

    def discard_task(self, task_id: str, keep_version: int | None = None) -> None:
        with self._lock:
            for key in [key for key in self._entries if key[0] == task_id and key[1] != keep_version]:
                self._pop(key)

    def _pop(self, key: TaskKey) -> None:
        artifact = self._entries.pop(key, None)
        if artifact is not None:
            self.num_bytes -= artifact.nbytes
