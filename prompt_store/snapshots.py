"""Index snapshots: every task's current record at one position of the change feed, in one object, so a starting
replica reads that object and the feed's entries after it instead of reading and validating every task (on S3 three
requests a task: about 25 minutes at 100,000 tasks on a 2-vCPU host).

snapshots/<12-digit feed position>-<digest>.json.gz    gzip'd JSON: {"format", "position", "digest", "tasks": [...]}

Written by the writer of every COMPACT_EVERY-th feed entry before it compacts the feed (compaction never removes an
entry after the newest snapshot, so a replica starting from it finds every change since), and by a replica whose
start-up had to read the whole store, if it holds at least SNAPSHOT_MIN_TASKS tasks. A snapshot's records are the
index its writer held: each version was validated when it was registered or first read, and a replica re-validates
a version's bytes when it loads them (every load from the store does), so a version damaged since is refused then,
with the same warning a full read at start-up gave. The digest names the backbone fingerprint and the limits the
records were validated against: a replica with other ones ignores snapshots not its own. A snapshot that cannot be
read or decoded is skipped with a warning (the replica reads the whole store instead): a damaged one costs time,
never tasks.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
from typing import Any, Protocol, TypeGuard

from prompt_store.adapter import StoreLimits, is_valid_task_id
from prompt_store.types import BackboneFingerprint, Method, TaskRecord

logger = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1
# A start-up that read every task writes a snapshot if the store holds at least this many (below it reading them
# all takes seconds, and small stores, tests' among them, keep their layout).
SNAPSHOT_MIN_TASKS = 1000
KEEP_SNAPSHOTS = 2  # the newest ones kept: a replica that listed them just before a new one went in still finds its
MAX_SNAPSHOT_BYTES = 1024**3
_NAME_RE = re.compile(r"(\d{12})-([0-9a-f]{16})\.json\.gz")
_RECORD_FIELDS = {"task_id": str, "version": int, "method": str, "num_virtual_tokens": int, "bytes": int,
                  "sha256": str, "created_at": str, "task_type": str}  # fmt: skip


class SnapshotStorage(Protocol):
    """What a backend keeps snapshots in (both backends implement it: backend.py's StoreBackend)."""

    @property
    def location(self) -> str: ...

    def snapshot_names(self) -> list[str]: ...

    def read_snapshot(self, name: str, max_bytes: int) -> bytes | None: ...

    def write_snapshot(self, name: str, data: bytes) -> bool: ...

    def remove_snapshot(self, name: str) -> None: ...


class SnapshotError(ValueError):
    """A snapshot that cannot be used: the message says what was expected and what was found."""


def snapshot_digest(fingerprint: BackboneFingerprint, limits: StoreLimits) -> str:
    """What the records were validated against: replicas with another backbone or other limits ignore them."""
    return hashlib.sha256(repr((fingerprint, limits)).encode()).hexdigest()[:16]


def snapshot_name(position: int, digest: str) -> str:
    return f"{position:012d}-{digest}.json.gz"


def parse_snapshot_name(name: str) -> tuple[int, str] | None:
    match = _NAME_RE.fullmatch(name)
    return (int(match.group(1)), match.group(2)) if match else None


def encode_snapshot(position: int, digest: str, records: list[TaskRecord]) -> bytes:
    tasks = [record.to_dict() for record in sorted(records, key=lambda record: record.task_id)]
    fields = {"format": SNAPSHOT_FORMAT, "position": position, "digest": digest, "tasks": tasks}
    return gzip.compress(json.dumps(fields, separators=(",", ":")).encode(), compresslevel=1)


def decode_snapshot(data: bytes, digest: str) -> tuple[int, list[TaskRecord]]:
    """(feed position, records); SnapshotError if the bytes are not a snapshot of this digest."""
    try:
        fields = json.loads(gzip.decompress(data))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"expected gzip'd JSON; found {type(exc).__name__}: {exc}") from None
    if not isinstance(fields, dict) or fields.get("format") != SNAPSHOT_FORMAT:
        found = fields.get("format") if isinstance(fields, dict) else type(fields).__name__
        raise SnapshotError(f"expected a snapshot object of format {SNAPSHOT_FORMAT}; found {found!r}")
    position, tasks = fields.get("position"), fields.get("tasks")
    if fields.get("digest") != digest or not is_count(position) or not isinstance(tasks, list):
        raise SnapshotError(
            f"expected digest {digest}, a position and a list of tasks; found digest {fields.get('digest')!r}, "
            f"position {position!r}, tasks of type {type(tasks).__name__}"
        )
    return position, [record_of(task) for task in tasks]


def record_of(fields: Any) -> TaskRecord:
    """A TaskRecord from its `to_dict()`; SnapshotError naming the first field that is not what it must be."""
    if not isinstance(fields, dict):
        raise SnapshotError(f"expected a task record object; found {str(fields)[:200]}")
    for name, kind in _RECORD_FIELDS.items():
        if not isinstance(fields.get(name), kind) or isinstance(fields.get(name), bool):
            raise SnapshotError(f"expected {name} of type {kind.__name__} in a task record; found {str(fields)[:200]}")
    labels, rank = fields.get("labels"), fields.get("rank")
    methods = {method.value for method in Method}
    if not is_valid_task_id(fields["task_id"]) or fields["version"] < 1 or fields["method"] not in methods:
        raise SnapshotError(f"expected a valid task id, version >= 1 and a known method; found {str(fields)[:200]}")
    if not (labels is None or (isinstance(labels, list) and all(isinstance(label, str) for label in labels))):
        raise SnapshotError(f"expected labels null or a list of names; found {str(labels)[:200]}")
    if not (rank is None or is_count(rank)):
        raise SnapshotError(f"expected rank null or a count; found {rank!r}")
    return TaskRecord(
        fields["task_id"], fields["version"], Method(fields["method"]), fields["num_virtual_tokens"], fields["bytes"],
        fields["sha256"], fields["created_at"], fields["task_type"], None if labels is None else tuple(labels), rank,
    )  # fmt: skip


def is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Snapshots:
    """A store's snapshots of one digest: the newest one read at start-up, new ones written and old ones pruned."""

    def __init__(self, storage: SnapshotStorage, fingerprint: BackboneFingerprint, limits: StoreLimits) -> None:
        self.storage = storage
        self.digest = snapshot_digest(fingerprint, limits)

    def newest(self) -> tuple[int, str] | None:
        """(position, name) of the newest snapshot of this digest; None if there is none."""
        mine = [(parsed[0], name) for name in self.storage.snapshot_names()
                if (parsed := parse_snapshot_name(name)) is not None and parsed[1] == self.digest]  # fmt: skip
        return max(mine, default=None)

    def load(self) -> tuple[int, list[TaskRecord]] | None:
        """The newest snapshot's position and records; None (logged why, if there was one) if it cannot be used."""
        newest = self.newest()
        if newest is None:
            return None
        name = newest[1]
        try:
            data = self.storage.read_snapshot(name, MAX_SNAPSHOT_BYTES)
            if data is None:
                raise SnapshotError("it was removed after it was listed")
            return decode_snapshot(data, self.digest)
        except (SnapshotError, ValueError) as exc:  # InvalidTask (too large) is a ValueError too
            logger.warning("not starting from the snapshot %s of %s (%s): reading every task instead", name,
                           self.storage.location, exc)  # fmt: skip
            return None

    def save(self, position: int, records: list[TaskRecord]) -> bool:
        """Write a snapshot at `position` and prune the older ones; False if one at that position existed."""
        written = self.storage.write_snapshot(snapshot_name(position, self.digest), encode_snapshot(
            position, self.digest, records))  # fmt: skip
        names = sorted(name for name in self.storage.snapshot_names() if parse_snapshot_name(name) is not None)
        for name in names[:-KEEP_SNAPSHOTS]:
            self.storage.remove_snapshot(name)
        return written
