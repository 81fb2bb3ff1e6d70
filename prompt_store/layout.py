"""Where things live in a store directory.

root/tasks/<task_id>/v000001/{adapter_config.json, adapter_model.safetensors, record.json}   complete versions
                             (+ labels.json: a classification task's label names)
root/.tmp/<random>/      versions being written (renamed into tasks/ when durable)
root/.trash/<random>/    deleted tasks and old versions on their way out
root/.tombstones/<id>    highest version a deleted task reached, so a version number is never reused
root/changes/000000000001.json   the change feed: one entry per write (changes.py)
root/snapshots/000000000100-<digest>.json.gz   every task's record at a feed position (snapshots.py)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from prompt_store.adapter import is_valid_task_id

RECORD_NAME = "record.json"
LABELS_NAME = "labels.json"
_VERSION_RE = re.compile(r"v(\d{6,})")


def version_name(version: int) -> str:
    return f"v{version:06d}"


def parse_version_name(name: str) -> int | None:
    match = _VERSION_RE.fullmatch(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True, slots=True)
class StoreLayout:
    root: Path

    @property
    def tasks_dir(self) -> Path:
        return self.root / "tasks"

    @property
    def tmp_dir(self) -> Path:
        return self.root / ".tmp"

    @property
    def trash_dir(self) -> Path:
        return self.root / ".trash"

    @property
    def tombstones_dir(self) -> Path:
        return self.root / ".tombstones"

    @property
    def changes_dir(self) -> Path:
        return self.root / "changes"

    @property
    def snapshots_dir(self) -> Path:  # created by the first snapshot
        return self.root / "snapshots"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    def create_dirs(self) -> None:
        for path in (self.tasks_dir, self.tmp_dir, self.trash_dir, self.tombstones_dir, self.changes_dir):
            path.mkdir(parents=True, exist_ok=True)

    def task_dir(self, task_id: str) -> Path:
        return self.tasks_dir / task_id

    def version_dir(self, task_id: str, version: int) -> Path:
        return self.task_dir(task_id) / version_name(version)

    def task_ids(self) -> list[str]:
        """Task directories on disk, sorted; foreign names (not valid task ids) are ignored."""
        try:
            names = os.listdir(self.tasks_dir)
        except FileNotFoundError:
            return []
        return sorted(name for name in names if is_valid_task_id(name))

    def versions(self, task_id: str) -> list[int]:
        """Version numbers present for a task, ascending; [] if the task directory is gone."""
        try:
            names = os.listdir(self.task_dir(task_id))
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = (parse_version_name(name) for name in names)
        return sorted(version for version in found if version is not None)

    def tombstone(self, task_id: str) -> int:
        """The highest version a deleted incarnation of the task reached (0 if none)."""
        try:
            return int((self.tombstones_dir / task_id).read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0
