"""The directory backend (the default): local disk or a shared volume, fsynced writes and atomic renames.

Writers in every process take the store's flock around staging, committing and deleting; see layout.py for
where things live.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path
from typing import Any

from prompt_store.adapter import StoreLimits
from prompt_store.changes import Change, change_name, decode_change, encode_change, parse_change_name
from prompt_store.errors import InvalidTask, StoreError
from prompt_store.fsio import (
    clear_dir,
    create_file_if_absent,
    file_lock,
    fsync_dir,
    move_to_trash,
    remove_tree,
    replace_file_durably,
)
from prompt_store.layout import StoreLayout
from prompt_store.types import BackboneFingerprint, TaskArtifact
from prompt_store.versions import ParsedAdapter, commit_version, read_version, stage_version

_MAX_APPEND_ATTEMPTS = 1000


class DirectoryBackend:
    is_local = True  # checking a version exists is a stat: every load does, so a version removed is never served

    def __init__(self, root: Path) -> None:
        self.layout = StoreLayout(root)
        self.layout.create_dirs()

    @property
    def location(self) -> str:
        return str(self.layout.root)

    def recover(self) -> int:
        with file_lock(self.layout.lock_path):  # no writer is mid-staging while we hold it
            num_partial = clear_dir(self.layout.tmp_dir) + clear_dir(self.layout.trash_dir)
            self._remove_empty_task_dirs()
        return num_partial

    def _remove_empty_task_dirs(self) -> None:
        """A writer killed between creating a task directory and committing into it leaves it empty."""
        for task_id in self.layout.task_ids():
            task_dir = self.layout.task_dir(task_id)
            if task_dir.is_dir() and not any(task_dir.iterdir()):
                task_dir.rmdir()

    def probe(self) -> None:
        self.listing()
        probe = self.layout.tmp_dir / f"probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"promptserve start-up probe")
        probe.unlink()

    def writing(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.layout.lock_path)

    def listing(self) -> dict[str, list[int]]:
        return {task_id: self.layout.versions(task_id) for task_id in self.layout.task_ids()}

    def versions(self, task_id: str) -> list[int]:
        return self.layout.versions(task_id)

    def stage(self, task_id: str, parsed: ParsedAdapter, created_at: str) -> Path:
        return stage_version(self.layout, task_id, parsed, created_at)

    def commit(self, task_id: str, staged: Path) -> tuple[int, bool]:
        return commit_version(self.layout, task_id, staged)

    def discard(self, staged: Path) -> None:
        remove_tree(staged)

    def drop_versions(self, task_id: str, versions: list[int]) -> None:
        for version in versions:
            # Rename first: another process never sees a half-removed version directory.
            trashed = move_to_trash(self.layout.version_dir(task_id, version), self.layout.trash_dir)
            if trashed is not None:
                remove_tree(trashed)
        if versions:
            fsync_dir(self.layout.task_dir(task_id))

    def delete(self, task_id: str) -> bool:
        versions = self.layout.versions(task_id)
        if not versions:
            return False
        # The tombstone goes first, so a later registration continues the numbering: (task_id, version)
        # keys the device caches, and a reused key would serve the deleted tensors.
        floor = max(*versions, self.layout.tombstone(task_id))
        tombstone = self.layout.tombstones_dir / task_id
        replace_file_durably(tombstone, str(floor).encode(), self.layout.tmp_dir)
        trashed = move_to_trash(self.layout.task_dir(task_id), self.layout.trash_dir)
        fsync_dir(self.layout.tasks_dir)
        if trashed is None:
            return False
        remove_tree(trashed)
        return True

    def read(
        self,
        task_id: str,
        version: int,
        fingerprint: BackboneFingerprint,
        limits: StoreLimits,
        manifest: dict[str, Any] | None = None,  # entries here carry none: the version's own files are local
    ) -> TaskArtifact:
        return read_version(self.layout, task_id, version, fingerprint, limits)

    def has_version(self, task_id: str, version: int) -> bool:
        return self.layout.version_dir(task_id, version).is_dir()

    def version_dir(self, task_id: str, version: int, limits: StoreLimits) -> Path:
        return self.layout.version_dir(task_id, version)

    # ---- the change feed: root/changes/<number>.json, listed with one listdir (a local directory is cheap to
    # list; compaction keeps it short)

    def append_change(
        self, task_id: str, version: int | None, staged: Any = None, record: dict[str, Any] | None = None
    ) -> int:
        data, changes_dir = encode_change(task_id, version, None, record), self.layout.changes_dir
        for _ in range(_MAX_APPEND_ATTEMPTS):
            seq = max(self.change_seqs_after(0), default=0) + 1
            if create_file_if_absent(changes_dir / change_name(seq), data, self.layout.tmp_dir):
                return seq
        raise StoreError(f"could not append to the change feed of {self.location} after {_MAX_APPEND_ATTEMPTS} tries")

    def change_seqs_after(self, seq: int) -> list[int]:
        found = (parse_change_name(name) for name in os.listdir(self.layout.changes_dir))
        return sorted(number for number in found if number is not None and number > seq)

    def read_change(self, seq: int) -> Change | None:
        try:
            return decode_change(seq, (self.layout.changes_dir / change_name(seq)).read_bytes())
        except FileNotFoundError:
            return None

    # ---- index snapshots (snapshots.py): root/snapshots/<name>, created whole (a hard link, as feed entries are)

    def snapshot_names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.layout.snapshots_dir))
        except FileNotFoundError:  # no snapshot written yet
            return []

    def read_snapshot(self, name: str, max_bytes: int) -> bytes | None:
        path = self.layout.snapshots_dir / name
        try:
            if path.stat().st_size > max_bytes:
                raise InvalidTask(f"{path}: expected at most {max_bytes} bytes; found {path.stat().st_size}")
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def write_snapshot(self, name: str, data: bytes) -> bool:
        self.layout.snapshots_dir.mkdir(exist_ok=True)
        return create_file_if_absent(self.layout.snapshots_dir / name, data, self.layout.tmp_dir)

    def remove_snapshot(self, name: str) -> None:
        (self.layout.snapshots_dir / name).unlink(missing_ok=True)

    def compact_changes(self, below: int, max_age_s: float) -> int:
        oldest_kept = time.time() - max_age_s
        num_removed = 0
        for seq in self.change_seqs_after(0):
            path = self.layout.changes_dir / change_name(seq)
            with contextlib.suppress(FileNotFoundError):  # another writer compacting at once
                if seq >= below or path.stat().st_mtime > oldest_kept:
                    break
                path.unlink()
                num_removed += 1
        return num_removed
