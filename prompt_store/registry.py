"""The durable task registry: one directory (local disk or a shared volume), many readers and writers.

Disk is the source of truth; the in-memory index is rebuilt at start-up and kept fresh by `refresh` (polling),
so tasks written or deleted by other processes show up without a restart.
"""

from __future__ import annotations

import builtins
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prompt_store.adapter import StoreLimits, is_valid_task_id, validate_task_id
from prompt_store.errors import InvalidTask, TaskNotFound
from prompt_store.fsio import clear_dir, file_lock, fsync_dir, move_to_trash, remove_tree, replace_file_durably
from prompt_store.layout import StoreLayout
from prompt_store.lru import ArtifactLRU
from prompt_store.types import BackboneFingerprint, TaskArtifact, TaskKey, TaskRecord
from prompt_store.versions import (
    commit_version,
    labels_of_dir,
    now_rfc3339,
    parse_upload,
    read_adapter_files,
    read_version,
    stage_version,
)

logger = logging.getLogger(__name__)

# Versions kept on disk behind the current one: a replica that has not polled yet may still resolve it.
OLD_VERSIONS_KEPT = 1


@dataclass(frozen=True, slots=True)
class StoreEvent:
    kind: Literal["registered", "deleted"]
    task_id: str
    version: int | None  # the new current version; None for "deleted"


StoreListener = Callable[[StoreEvent], None]


class TaskStore:
    """Registers, versions, deletes and loads tasks; safe to share between threads and processes."""

    def __init__(
        self,
        root: str | Path,
        fingerprint: BackboneFingerprint,
        limits: StoreLimits = StoreLimits(),
        max_cached_artifacts: int = 256,  # CPU artifacts kept for repeated loads (bounded also by bytes)
    ) -> None:
        self.layout = StoreLayout(Path(root))
        self.fingerprint = fingerprint
        self.limits = limits
        self._records: dict[str, TaskRecord] = {}  # task_id -> current version
        self._rejected: set[TaskKey] = set()  # version dirs that failed validation: skipped, logged once
        self._index_lock = threading.Lock()  # short: guards the two fields above
        self._write_lock = threading.Lock()  # orders this process's commits, deletes and rescans
        self._listeners: list[StoreListener] = []
        self._artifacts = ArtifactLRU(max_entries=max_cached_artifacts)
        self._poller: threading.Thread | None = None
        self._stop_polling = threading.Event()
        self.layout.create_dirs()
        self._recover()

    @property
    def root(self) -> Path:
        return self.layout.root

    # ---- start-up

    def _recover(self) -> None:
        started = time.monotonic()
        with file_lock(self.layout.lock_path):  # no writer is mid-staging while we hold it
            num_partial = clear_dir(self.layout.tmp_dir) + clear_dir(self.layout.trash_dir)
            self._remove_empty_task_dirs()
        self._rescan(None, emit=False)
        logger.info(
            "recovered %d tasks from %s in %.3f s (%d partial writes discarded)",
            len(self),
            self.root,
            time.monotonic() - started,
            num_partial,
        )

    def _remove_empty_task_dirs(self) -> None:
        """A writer killed between creating a task directory and committing into it leaves it empty."""
        for task_id in self.layout.task_ids():
            task_dir = self.layout.task_dir(task_id)
            if task_dir.is_dir() and not any(task_dir.iterdir()):
                task_dir.rmdir()

    # ---- writes

    def register(
        self, task_id: str, adapter_config: bytes, adapter_model: bytes, labels: bytes | None = None
    ) -> tuple[TaskRecord, bool]:
        """Validate and durably store a new version; return (record, created: True if the task was new).
        `labels`: a classification task's label names, a JSON array (default LABEL_0, LABEL_1, ...)."""
        validate_task_id(task_id)
        parsed = parse_upload(adapter_config, adapter_model, self.fingerprint, self.limits, labels)
        created_at = now_rfc3339()
        with file_lock(self.layout.lock_path):
            staging = stage_version(self.layout, task_id, parsed, created_at)
            try:
                with self._write_lock:
                    version, created = commit_version(self.layout, task_id, staging)
                    record = parsed.record(task_id, version, created_at)
                    is_changed = self._set_record(task_id, record)
            finally:
                remove_tree(staging)  # a no-op once committed; clears a failed attempt
            self._drop_old_versions(task_id, version)
        self._artifacts.put(parsed.artifact(record))
        logger.info("registered task %r version %d (%s)", task_id, version, record.method.value)
        if is_changed:
            self._emit([StoreEvent("registered", task_id, version)])
        return record, created

    def validate(
        self, task_id: str, adapter_config: bytes, adapter_model: bytes, labels: bytes | None = None
    ) -> TaskArtifact:
        """What `register` would store, checked but not stored: a provisional artifact (version 0)."""
        validate_task_id(task_id)
        parsed = parse_upload(adapter_config, adapter_model, self.fingerprint, self.limits, labels)
        return parsed.artifact(parsed.record(task_id, 0, now_rfc3339()))

    def register_dir(self, task_id: str, adapter_dir: str | Path) -> tuple[TaskRecord, bool]:
        """Register a directory written by PEFT's `save_pretrained` (label names from a `config.json`'s id2label
        next to it, if there is one)."""
        validate_task_id(task_id)
        adapter_config, adapter_model = read_adapter_files(Path(adapter_dir), self.limits)
        return self.register(task_id, adapter_config, adapter_model, labels_of_dir(Path(adapter_dir)))

    def _drop_old_versions(self, task_id: str, current: int) -> None:
        older = [version for version in self.layout.versions(task_id) if version < current]
        doomed = older[: max(0, len(older) - OLD_VERSIONS_KEPT)]
        for version in doomed:
            # Rename first: another process never sees a half-removed version directory.
            trashed = move_to_trash(self.layout.version_dir(task_id, version), self.layout.trash_dir)
            if trashed is not None:
                remove_tree(trashed)
            self._artifacts.discard((task_id, version))
        if doomed:
            fsync_dir(self.layout.task_dir(task_id))

    def delete(self, task_id: str) -> None:
        """Atomically remove every version of a task; TaskNotFound if there is none."""
        if not is_valid_task_id(task_id):
            raise TaskNotFound(task_id)
        with file_lock(self.layout.lock_path), self._write_lock:
            trashed = self._delete_on_disk(task_id)
            is_changed = self._set_record(task_id, None)
        self._artifacts.discard_task(task_id)
        if is_changed:
            self._emit([StoreEvent("deleted", task_id, None)])
        if trashed is None:
            raise TaskNotFound(task_id)
        remove_tree(trashed)
        logger.info("deleted task %r", task_id)

    def _delete_on_disk(self, task_id: str) -> Path | None:
        versions = self.layout.versions(task_id)
        if not versions:
            return None
        # The tombstone goes first, so a later registration continues the numbering: (task_id, version)
        # keys the device caches, and a reused key would serve the deleted tensors.
        floor = max(*versions, self.layout.tombstone(task_id))
        tombstone = self.layout.tombstones_dir / task_id
        replace_file_durably(tombstone, str(floor).encode(), self.layout.tmp_dir)
        trashed = move_to_trash(self.layout.task_dir(task_id), self.layout.trash_dir)
        fsync_dir(self.layout.tasks_dir)
        return trashed

    # ---- reads

    def get(self, task_id: str) -> TaskRecord:
        with self._index_lock:
            record = self._records.get(task_id)
        if record is None:
            raise TaskNotFound(task_id)
        return record

    def list(self) -> list[TaskRecord]:
        with self._index_lock:
            records = builtins.list(self._records.values())
        return sorted(records, key=lambda record: record.task_id)

    def __len__(self) -> int:
        return len(self._records)

    def load(self, task_id: str, version: int | None = None) -> TaskArtifact:
        """A validated CPU artifact of the given (default: current) version; TaskNotFound if absent."""
        if not is_valid_task_id(task_id):
            raise TaskNotFound(task_id, version)
        if version is not None:
            return self._load_version(task_id, version)
        with self._index_lock:
            record = self._records.get(task_id)
        if record is not None:
            try:
                return self._load_version(task_id, record.version)
            except TaskNotFound:
                pass  # replaced or deleted by another process since our last scan
            except InvalidTask as exc:
                self._reject(task_id, record.version, exc)
        # Disk is the truth: rescan this one task (it may also be new from another process).
        self._rescan([task_id], emit=True)
        return self._load_version(task_id, self.get(task_id).version)

    def _load_version(self, task_id: str, version: int) -> TaskArtifact:
        if not self.layout.version_dir(task_id, version).is_dir():
            raise TaskNotFound(task_id, version)
        cached = self._artifacts.get((task_id, version))
        if cached is not None:
            return cached
        artifact = read_version(self.layout, task_id, version, self.fingerprint, self.limits)
        self._artifacts.put(artifact)
        return artifact

    def cached_keys(self) -> builtins.list[TaskKey]:
        """Task versions parsed and held in CPU memory, so their next load skips the disk (metrics' host tier)."""
        return self._artifacts.keys()

    def version_dir(self, task_id: str, version: int) -> Path:
        """The PEFT adapter directory of a version (`PeftModel.from_pretrained` loads it)."""
        if not is_valid_task_id(task_id) or not self.layout.version_dir(task_id, version).is_dir():
            raise TaskNotFound(task_id, version)
        return self.layout.version_dir(task_id, version)

    # ---- hot-loading

    def refresh(self) -> bool:
        """Rescan the directory; True if any task appeared, changed version or disappeared."""
        return bool(self._rescan(None, emit=True))

    def add_listener(self, listener: StoreListener) -> None:
        with self._index_lock:
            self._listeners.append(listener)

    def start_polling(self, interval_s: float) -> None:
        """Refresh every `interval_s` seconds on a daemon thread; 0 or less disables polling."""
        self.stop_polling()
        if interval_s <= 0:
            return
        self._stop_polling = stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, args=(interval_s, stop), name="task-store-poll", daemon=True)
        self._poller.start()

    def stop_polling(self) -> None:
        poller, self._poller = self._poller, None
        if poller is None:
            return
        self._stop_polling.set()
        if poller is not threading.current_thread():  # a listener may stop polling from the poll thread
            poller.join()

    def close(self) -> None:
        self.stop_polling()

    def _poll(self, interval_s: float, stop: threading.Event) -> None:
        while not stop.wait(interval_s):
            try:
                self.refresh()
            except Exception:  # a flaky shared volume must not kill hot-loading for good
                logger.exception("refreshing the task store at %s failed; retrying in %.1f s", self.root, interval_s)

    # ---- index maintenance

    def _rescan(self, task_ids: builtins.list[str] | None, emit: bool) -> builtins.list[StoreEvent]:
        with self._write_lock:
            with self._index_lock:
                known = dict(self._records)
            if task_ids is None:
                task_ids = sorted(set(self.layout.task_ids()) | set(known))
            events = [event for task_id in task_ids if (event := self._rescan_task(task_id, known.get(task_id)))]
        if emit:
            self._emit(events)
        return events

    def _rescan_task(self, task_id: str, current: TaskRecord | None) -> StoreEvent | None:
        found = self._newest_valid(task_id, current)
        if not self._set_record(task_id, found):
            return None
        if found is None:
            self._artifacts.discard_task(task_id)
            return StoreEvent("deleted", task_id, None)
        return StoreEvent("registered", task_id, found.version)

    def _newest_valid(self, task_id: str, current: TaskRecord | None) -> TaskRecord | None:
        for version in reversed(self.layout.versions(task_id)):
            if current is not None and version == current.version:
                return current
            if (task_id, version) in self._rejected:
                continue
            try:
                artifact = read_version(self.layout, task_id, version, self.fingerprint, self.limits)
            except TaskNotFound:
                continue  # removed while we looked
            except (InvalidTask, OSError) as exc:
                self._reject(task_id, version, exc)
                continue
            self._artifacts.put(artifact)
            return artifact.record
        return None

    def _reject(self, task_id: str, version: int, exc: Exception) -> None:
        logger.warning("not serving version %d of task %r: %s", version, task_id, exc)
        with self._index_lock:
            self._rejected.add((task_id, version))

    def _set_record(self, task_id: str, record: TaskRecord | None) -> bool:
        """Install the current version (callers hold the write lock); False if the index already said so."""
        with self._index_lock:
            previous = self._records.get(task_id)
            if record is None:
                self._records.pop(task_id, None)
            else:
                self._records[task_id] = record
            return record != previous

    def _emit(self, events: builtins.list[StoreEvent]) -> None:
        with self._index_lock:
            listeners = builtins.list(self._listeners)
        for event in events:
            for listener in listeners:
                try:
                    listener(event)
                except Exception:  # one broken listener must not stop the others or the writer
                    logger.exception("task store listener %r failed on %s", listener, event)
