"""The durable task registry: one store (a directory, local or shared, or an S3 bucket), many readers and writers.

The store is the source of truth; the in-memory index is rebuilt at start-up and kept fresh by `refresh` (polling),
so tasks written or deleted by other processes show up without a restart. Start-up reads the newest index snapshot
and the feed's entries after it (snapshots.py), or, with none, every task. A refresh reads the store's change feed
(changes.py) from the last entry it applied, so a poll that finds nothing costs one listing of no entries however
many tasks the store holds; the whole store is listed when the feed has lost entries this process did not read, and
as a safety net every `rescan_every_s` (start_polling).

Consistency between processes (replicas) sharing a store:
- a registration is servable everywhere as soon as `register` returns: a process that does not know an id looks it
  up in the store before saying TaskNotFound (rate-limited: see lookups.py);
- a replacement or deletion elsewhere reaches a process's index within one poll interval (`start_polling`); until
  then it serves the version it knows. On a directory a load notices sooner (a version removed from disk is never
  served); on S3 a cached artifact is trusted until the poll, so the window is the poll interval plus one refresh.
- a writer killed between its write and the write's feed entry leaves a change the feed does not carry: the next
  safety-net rescan of any polling process finds it and appends the entry, so every process has it within that
  rescan's interval plus a poll interval (a process that does not poll: at its next start after that).
"""

from __future__ import annotations

import builtins
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from prompt_store.adapter import StoreLimits, is_valid_task_id, validate_task_id
from prompt_store.backend import StoreBackend, StoreTimeouts, open_backend
from prompt_store.changes import COMPACT_EVERY, MAX_CHANGES_PER_READ, RETENTION_S, Change
from prompt_store.errors import InvalidTask, LookupThrottled, StoreError, TaskNotFound
from prompt_store.layout import StoreLayout
from prompt_store.lookups import LookupLimiter
from prompt_store.lru import HostArtifacts
from prompt_store.polling import RESCAN_EVERY_S, Poller
from prompt_store.snapshots import SNAPSHOT_MIN_TASKS, SnapshotError, Snapshots, record_of
from prompt_store.types import BackboneFingerprint, HostCacheStats, TaskArtifact, TaskKey, TaskRecord
from prompt_store.versions import labels_of_dir, now_rfc3339, parse_upload, read_adapter_files

logger = logging.getLogger(__name__)

# Versions kept in the store behind the current one: a replica that has not polled yet may still resolve it.
OLD_VERSIONS_KEPT = 1


@dataclass(frozen=True, slots=True)
class StoreEvent:
    kind: Literal["registered", "deleted"]
    task_id: str
    version: int | None  # the new current version; None for "deleted"


StoreListener = Callable[[StoreEvent], None]


class TaskStore:
    """Registers, versions, deletes and loads tasks; safe to share between threads and processes.

    `location`: a directory (created if missing; the default backend) or `s3://bucket/prefix` (its endpoint,
    region and credentials from the standard AWS environment variables); StoreError if it cannot be opened.
    """

    def __init__(
        self,
        location: str | Path,
        fingerprint: BackboneFingerprint,
        limits: StoreLimits = StoreLimits(),
        max_cached_artifacts: int = 256,  # prompt-learning CPU artifacts kept for repeated loads (bounded by bytes too)
        max_cached_adapters: int = 64,  # LoRA / IA3 CPU artifacts kept apart (the engine's max_cpu_loras)
        lookups: LookupLimiter | None = None,  # rate limits on looking up unknown ids (default: lookups.py's)
        timeouts: StoreTimeouts = StoreTimeouts(),  # an S3 endpoint's
    ) -> None:
        self.backend: StoreBackend = open_backend(location, timeouts)
        self.fingerprint = fingerprint
        self.limits = limits
        self._records: dict[str, TaskRecord] = {}  # task_id -> current version
        self._rejected: set[TaskKey] = set()  # version dirs that failed validation: skipped, logged once
        self._index_lock = threading.Lock()  # short: guards the two fields above
        self._write_lock = threading.Lock()  # orders this process's commits, deletes and rescans
        self._listeners: list[StoreListener] = []
        self._artifacts = HostArtifacts(max_entries=max_cached_artifacts, max_adapters=max_cached_adapters)
        self._poller: Poller | None = None
        self._refresh_lock = threading.Lock()  # one refresh at a time: each moves the feed position
        self._feed_position = 0  # the newest change feed entry applied to the index (and every one before it)
        self._lookups = LookupLimiter() if lookups is None else lookups
        self._snapshots = Snapshots(self.backend, fingerprint, limits)
        self._recover()

    @property
    def location(self) -> str:
        """The path or URI the store was opened on: `TaskStore(store.location, ...)` opens it again."""
        return self.backend.location

    @property
    def root(self) -> Path:
        """A directory store's root (StoreError on S3)."""
        return self.layout.root

    @property
    def layout(self) -> StoreLayout:
        """A directory store's layout (StoreError on S3)."""
        layout = getattr(self.backend, "layout", None)
        if not isinstance(layout, StoreLayout):
            raise StoreError(f"{self.location} is not a directory store")
        return layout

    # ---- start-up

    def _recover(self) -> None:
        """Start from the newest index snapshot and the feed's entries after it; without a usable one, read every
        task (and leave a snapshot for the next replica). Leftovers of killed writers: a directory clears them here
        (it is local); on S3 that is a listing of every upload, which the poller does hourly instead."""
        started = time.monotonic()
        num_partial = self.backend.recover() if self.backend.is_local else 0
        loaded = self._snapshots.load()
        if loaded is not None:
            position, records = loaded
            with self._index_lock:
                self._records = {record.task_id: record for record in records}
            # Compaction keeps the snapshot's own entry: without it the feed does not reach the snapshot (removed or
            # restored from elsewhere), so the store's listing is checked against the records instead.
            seqs = self.backend.change_seqs_after(max(0, position - 1))
            if position == 0 or seqs[:1] == [position]:
                self._feed_position = position
                self._apply_changes(seqs[1:] if position else seqs)  # a gap after it: a listing, as below
            else:
                self._list_store()  # reads only the tasks whose versions differ from the records
            how = f"a snapshot at feed entry {position}, then the feed to entry {self._feed_position}"
        else:
            self._list_store()
            how = "every task read"
            if len(self) >= SNAPSHOT_MIN_TASKS:
                self._write_snapshot()
        logger.info("recovered %d tasks from %s in %.3f s (%s; %d partial writes discarded)", len(self),
                    self.location, time.monotonic() - started, how, num_partial)  # fmt: skip

    def _list_store(self) -> None:
        end = self._feed_end()  # before the listing: a change made during it is read again from the feed
        self._rescan_all()
        self._feed_position = end

    # ---- writes

    def register(
        self, task_id: str, adapter_config: bytes, adapter_model: bytes, labels: bytes | None = None
    ) -> tuple[TaskRecord, bool]:
        """Validate and durably store a new version; return (record, created: True if the task was new).
        `labels`: a classification task's label names, a JSON array (default LABEL_0, LABEL_1, ...)."""
        validate_task_id(task_id)
        parsed = parse_upload(adapter_config, adapter_model, self.fingerprint, self.limits, labels)
        created_at = now_rfc3339()
        with self.backend.writing():
            staged = self.backend.stage(task_id, parsed, created_at)
            try:
                with self._write_lock:
                    version, created = self.backend.commit(task_id, staged)
                    record = parsed.record(task_id, version, created_at)
                    is_changed = self._set_record(task_id, record)
            finally:
                self.backend.discard(staged)  # a no-op once committed; clears a failed attempt
            self._drop_old_versions(task_id, version)
        self._announce(task_id, version, staged, record)
        self._lookups.found(task_id)
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
        older = [version for version in self.backend.versions(task_id) if version < current]
        doomed = older[: max(0, len(older) - OLD_VERSIONS_KEPT)]
        self.backend.drop_versions(task_id, doomed)
        for version in doomed:
            self._artifacts.discard((task_id, version))

    def _announce(
        self, task_id: str, version: int | None, staged: object = None, record: TaskRecord | None = None
    ) -> None:
        """Append a write just made to the change feed (`staged`, `record`: the upload of a version this process
        wrote, and its record). The write stands if that fails: the safety-net rescans find and announce it (an
        error here would tell the client that a stored version was not)."""
        carried = None if record is None else {"digest": self._snapshots.digest, "record": record.to_dict()}
        try:
            seq = self.backend.append_change(task_id, version, staged, carried)
        except (StoreError, OSError) as exc:
            what = "deleted" if version is None else f"version {version} stored"
            logger.error("task %r %s, but the change feed could not say so (%s): other replicas see it at their "
                         "next full rescan", task_id, what, exc)  # fmt: skip
            return
        if seq % COMPACT_EVERY == 0:
            if self._poller is not None:
                self._poller.compact_feed(seq)  # off the request path: a snapshot of every task goes first
            else:
                self.compact_feed(seq)

    def compact_feed(self, seq: int) -> None:
        """Write an index snapshot at the feed's end, then remove the feed's entries older than RETENTION_S below
        entry `seq` and below the newest snapshot (a replica starting from it finds every change since)."""
        try:
            self.snapshot()
        except (StoreError, OSError) as exc:  # the older snapshot still bounds the compaction
            logger.warning("writing an index snapshot of %s failed: %s", self.location, exc)
        try:
            newest = self._snapshots.newest()
            self.backend.compact_changes(seq if newest is None else min(seq, newest[0]), RETENTION_S)
        except (StoreError, OSError) as exc:  # the next compaction removes them
            logger.warning("compacting the change feed of %s failed: %s", self.location, exc)

    def snapshot(self) -> int:
        """Apply the feed's new entries, then write every task's record at that position (snapshots.py), so a
        starting replica reads one object, not every task; return the position."""
        with self._refresh_lock:
            events = self._apply_changes()
            position = self._write_snapshot()
        self._emit(events)
        return position

    def _write_snapshot(self) -> int:
        with self._index_lock:
            records = builtins.list(self._records.values())
        position = self._feed_position  # the index holds every change up to it (and maybe some after: harmless)
        self._snapshots.save(position, records)
        return position

    def delete(self, task_id: str) -> None:
        """Atomically remove every version of a task; TaskNotFound if there is none."""
        if not is_valid_task_id(task_id):
            raise TaskNotFound(task_id)
        with self.backend.writing(), self._write_lock:
            # The backend leaves a tombstone, so a later registration continues the numbering: (task_id, version)
            # keys the device caches, and a reused key would serve the deleted tensors.
            is_found = self.backend.delete(task_id)
            is_changed = self._set_record(task_id, None)
        self._artifacts.discard_task(task_id)
        if is_found:
            self._announce(task_id, None)
        if is_changed:
            self._emit([StoreEvent("deleted", task_id, None)])
        if not is_found:
            raise TaskNotFound(task_id)
        logger.info("deleted task %r", task_id)

    # ---- reads

    def get(self, task_id: str) -> TaskRecord:
        """The current version's record; an id this process does not know is looked up in the store first."""
        with self._index_lock:
            record = self._records.get(task_id)
        if record is None:
            return self._look_up(task_id)
        return record

    def _look_up(self, task_id: str) -> TaskRecord:
        """Rescan one task this process does not know (rate-limited: lookups.py); TaskNotFound if absent."""
        if not is_valid_task_id(task_id) or self._lookups.recently_missed(task_id):
            raise TaskNotFound(task_id)
        if not self._lookups.allow():
            raise LookupThrottled(
                f"task {task_id!r} is not known to this replica, which cannot look it up in the store now "
                f"(over {self._lookups.per_second:g} lookups/s of unknown ids); retry shortly"
            )
        self._rescan([task_id], emit=True)
        with self._index_lock:
            record = self._records.get(task_id)
        if record is None:
            self._lookups.missed(task_id)
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
            # The store is the truth: rescan this one task (replaced or deleted by another process).
            self._rescan([task_id], emit=True)
            return self._load_version(task_id, self.get(task_id).version)
        # Unknown here: maybe new from another process (a rate-limited lookup, so no stale 404).
        return self._load_version(task_id, self._look_up(task_id).version)

    def _load_version(self, task_id: str, version: int) -> TaskArtifact:
        # Cheap on a directory (a stat), so a version removed there is never served; on S3 a request per load
        # would cost more than the poll interval's window it closes.
        if self.backend.is_local and not self.backend.has_version(task_id, version):
            raise TaskNotFound(task_id, version)
        read = partial(self.backend.read, task_id, version, self.fingerprint, self.limits)
        return self._artifacts.load((task_id, version), read)

    def cached_keys(self) -> builtins.list[TaskKey]:
        """Task versions parsed and held in CPU memory, so their next load skips the disk (metrics' host tier)."""
        return self._artifacts.keys()

    def cached_adapter_stats(self) -> HostCacheStats:
        """The LoRA / IA3 shelf of the host tier: loads served from it and read from the store, what it holds."""
        return self._artifacts.adapters.stats()

    def version_dir(self, task_id: str, version: int) -> Path:
        """The PEFT adapter directory of a version (`PeftModel.from_pretrained` loads it); on S3 a local copy,
        downloaded once into a temporary directory that lives as long as the store."""
        if not is_valid_task_id(task_id) or not self.backend.has_version(task_id, version):
            raise TaskNotFound(task_id, version)
        return self.backend.version_dir(task_id, version, self.limits)

    # ---- hot-loading

    def refresh(self) -> bool:
        """Apply what other processes changed since the last refresh (the change feed's new entries; the whole
        store if the feed lost some); True if any task appeared, changed version or disappeared."""
        with self._refresh_lock:
            events = self._apply_changes()
        self._emit(events)
        return bool(events)

    def rescan(self) -> bool:
        """List the whole store (the safety net under the change feed); announce in the feed any change it did not
        carry (a writer killed before announcing); True if any task appeared, changed version or disappeared."""
        events = self._rescan_all()
        for event in events:
            self._announce(event.task_id, event.version)
        self._emit(events)
        return bool(events)

    def add_listener(self, listener: StoreListener) -> None:
        with self._index_lock:
            self._listeners.append(listener)

    def start_polling(self, interval_s: float, rescan_every_s: float = RESCAN_EVERY_S) -> None:
        """Refresh every `interval_s` seconds on a daemon thread, and on another `rescan` about every
        `rescan_every_s` (polling.py); 0 or less disables each."""
        self.stop_polling()
        if interval_s > 0:
            self._poller = Poller(self, interval_s, rescan_every_s)

    def stop_polling(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.stop()

    def close(self) -> None:
        self.stop_polling()

    def clear_leftovers(self) -> None:
        """Remove what killed writers left behind (safe while others write: a directory locks, S3 spares young
        uploads); the poller does it hourly, start-up once."""
        num_partial = self.backend.recover()
        if num_partial:
            logger.info("discarded %d partial writes in %s", num_partial, self.location)

    # ---- index maintenance

    def _feed_end(self) -> int:
        """The newest entry of the change feed (0 if it has none: a new store, or one written before the feed)."""
        return max(self.backend.change_seqs_after(self._feed_position), default=self._feed_position)

    def _apply_changes(self, listed: builtins.list[int] | None = None) -> builtins.list[StoreEvent]:
        """Rescan the tasks named by the feed's entries after our position (callers hold the refresh lock);
        `listed`: those entries' numbers, if the caller has just listed them."""
        position = self._feed_position
        seqs = self.backend.change_seqs_after(position) if listed is None else listed
        if not seqs:
            return []
        changes = [self.backend.read_change(seq) for seq in seqs] if len(seqs) <= MAX_CHANGES_PER_READ else []
        if seqs[0] != position + 1 or not changes or None in changes:
            logger.info("the change feed of %s lost entries after %d, or is %d behind: rescanning every task",
                        self.location, position, len(seqs))  # fmt: skip
            events = self._rescan_all()
            self._feed_position = seqs[-1]  # listed before the store was: changes made meanwhile are read again
            return events
        latest = {change.task_id: change for change in changes if change is not None}  # the last one per task
        stale = sorted((change for change in latest.values() if not self._knows(change)), key=lambda c: c.task_id)
        with self._write_lock:
            with self._index_lock:
                known = dict(self._records)
            events = [event for change in stale if (event := self._apply_change(change, known.get(change.task_id)))]
        self._feed_position = seqs[-1]
        return events

    def _apply_change(self, change: Change, current: TaskRecord | None) -> StoreEvent | None:
        """Bring a task in line with its feed entry: a version newer than ours is installed from the record the
        entry carries, or else read directly; a deletion, or a version gone or damaged by now, lists the task's
        versions."""
        task_id, version = change.task_id, change.version
        if version is not None and (current is None or version > current.version):
            found = self._carried(change) or self._newest_valid(task_id, None, [version], change.manifest)
            if found is not None:
                return self._install(task_id, found)
        return self._rescan_task(task_id, current, self.backend.versions(task_id))

    def _carried(self, change: Change) -> TaskRecord | None:
        """The record the entry's writer validated the version to, if against this replica's backbone and limits:
        the version is installed unread, and its files are read and validated at its first load (`load`), as a
        snapshot's records are; a version damaged since is refused then and an older one served."""
        carried = change.record or {}
        if carried.get("digest") != self._snapshots.digest or (change.task_id, change.version) in self._rejected:
            return None
        try:
            record = record_of(carried.get("record"))
        except SnapshotError as exc:
            logger.warning("ignoring the record in change feed entry %d: %s", change.seq, exc)
            return None
        return record if record.key == (change.task_id, change.version) else None

    def _knows(self, change: Change) -> bool:
        """The index is at the change's version already (our own write, or a lookup since)."""
        with self._index_lock:
            record = self._records.get(change.task_id)
        return (record.version if record is not None else None) == change.version

    def _rescan_all(self) -> builtins.list[StoreEvent]:
        """List the whole store and bring the index in line with it (events not emitted).

        The listing takes no lock (on S3 it is a LIST page per 1,000 tasks, seconds for a big store): writes, lookups
        and refreshes go on meanwhile, and a task whose index entry changed during the listing knows more than the
        listing did, so it is left as it is."""
        with self._index_lock:
            before = dict(self._records)
        listing = self.backend.listing()
        with self._write_lock:
            with self._index_lock:
                after = dict(self._records)
            return [
                event
                for task_id in sorted(set(listing) | set(before))
                if before.get(task_id) == after.get(task_id)
                and (event := self._rescan_task(task_id, before.get(task_id), listing.get(task_id, [])))
            ]

    def _rescan(self, task_ids: builtins.list[str], emit: bool) -> builtins.list[StoreEvent]:
        """Bring the index in line with the store for these tasks (a listing of each)."""
        with self._write_lock:
            with self._index_lock:
                known = dict(self._records)
            events = [
                event
                for task_id in task_ids
                if (event := self._rescan_task(task_id, known.get(task_id), self.backend.versions(task_id)))
            ]
        if emit:
            self._emit(events)
        return events

    def _rescan_task(self, task_id: str, current: TaskRecord | None, versions: builtins.list[int]) -> StoreEvent | None:
        return self._install(task_id, self._newest_valid(task_id, current, versions))

    def _install(self, task_id: str, found: TaskRecord | None) -> StoreEvent | None:
        """Make `found` the task's current version (None: deleted); the event, or None if the index had it."""
        if not self._set_record(task_id, found):
            return None
        if found is None:
            self._artifacts.discard_task(task_id)
            return StoreEvent("deleted", task_id, None)
        return StoreEvent("registered", task_id, found.version)

    def _newest_valid(
        self,
        task_id: str,
        current: TaskRecord | None,
        versions: builtins.list[int],
        manifest: dict[str, Any] | None = None,  # the newest version's, as its feed entry carries it
    ) -> TaskRecord | None:
        for version in reversed(versions):
            if (task_id, version) in self._rejected:  # the current one too: a snapshot's record, refused on its load
                continue
            if current is not None and version == current.version:
                return current
            try:
                given = manifest if version == versions[-1] else None
                artifact = self.backend.read(task_id, version, self.fingerprint, self.limits, given)
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
