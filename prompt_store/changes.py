"""The change feed: every write (a new version, a deletion) also appends a numbered entry naming its task, so a
replica finds what changed by reading the entries after the last one it applied, not by listing every task.

Entries are created exclusively (S3: `If-None-Match: *`; a directory: a hard link, which fails on an existing
name), each at the number after the newest one its writer sees, so numbers are dense: a reader that finds the
entry after its position missing (compacted away while it was not looking) rescans the whole store instead.
The entry goes in after the write it announces; a writer killed between the two leaves a version no entry names,
which the safety-net rescan finds and announces (registry.py). An S3 writer also puts the version's manifest in its
entry, so a reader goes straight to the version's files (a request fewer per replica and change); and a writer that
registered the version puts its record there, with the digest of the backbone and limits it was validated against,
so a reader of the same digest installs the new version without reading it at all, and reads and validates its
files at its first load, as it does a snapshot's records (registry.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from prompt_store.adapter import is_valid_task_id

# Entries older than this are removed (keeping the newest): a replica that has not read the feed for longer
# rescans the store once. Far longer than a poll interval; short enough that finding the feed's end at start-up
# (a LIST of every entry kept) stays a few pages.
RETENTION_S = 600.0
# One write in this many also removes the feed's expired entries (a LIST of the oldest page and their deletes).
COMPACT_EVERY = 100
# A replica more entries than this behind rescans the store instead (a few LIST pages beat one GET per entry).
MAX_CHANGES_PER_READ = 1000
CHANGE_FORMAT = 1
_DIGITS = 12  # fixed width: names sort as numbers do, so S3 can list the entries after one (StartAfter)
_NAME_RE = re.compile(rf"(\d{{{_DIGITS}}})\.json")


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    task_id: str
    version: int | None  # the task's new current version; None: the task was deleted
    manifest: dict[str, Any] | None = None  # the version's manifest as its writer created it (S3), or None
    record: dict[str, Any] | None = None  # {"digest", "record"}: the version's record as its writer validated it


def change_name(seq: int) -> str:
    if not 0 <= seq < 10**_DIGITS:
        raise ValueError(f"change feed numbers are 0..{10**_DIGITS - 1}; found {seq}")
    return f"{seq:0{_DIGITS}d}.json"


def parse_change_name(name: str) -> int | None:
    match = _NAME_RE.fullmatch(name)
    return int(match.group(1)) if match else None


def encode_change(
    task_id: str, version: int | None, manifest: dict[str, Any] | None = None, record: dict[str, Any] | None = None
) -> bytes:
    fields = {"format": CHANGE_FORMAT, "task_id": task_id, "version": version}
    optional = {"manifest": manifest, "record": record}
    return json.dumps(fields | {name: value for name, value in optional.items() if value is not None}).encode()


def decode_change(seq: int, data: bytes) -> Change | None:
    """An entry's change; None if it is not one (damaged, or written by something else)."""
    try:
        fields = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(fields, dict):
        return None
    task_id, version = fields.get("task_id"), fields.get("version")
    if not isinstance(task_id, str) or not is_valid_task_id(task_id):
        return None
    if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
        return None
    # Absent from entries announced by a rescan, and from older writers' (the record also from S3's oversized ones).
    manifest, record = (value if isinstance(value := fields.get(name), dict) and version is not None else None
                        for name in ("manifest", "record"))  # fmt: skip
    return Change(seq, task_id, version, manifest, record)
