"""Where task versions live: one interface, two backends (a directory, the default; an S3 bucket for replicas).

A backend owns the durable bytes and the promises about them (atomic, immutable, never-reused versions), the change
feed that announces each write (changes.py) and the index snapshots that sum it up (snapshots.py); the registry
above it owns the in-memory index, the artifact LRU, polling and listeners.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prompt_store.adapter import StoreLimits
from prompt_store.changes import Change
from prompt_store.errors import StoreError
from prompt_store.types import BackboneFingerprint, TaskArtifact
from prompt_store.versions import ParsedAdapter

S3_SCHEME = "s3://"
# something that reads as a URI (`gs://...`, `S3://...`, `s3:/...`): refused unless exactly s3://, never a directory
_URI_LIKE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/|^(s3|S3):")


@dataclass(frozen=True, slots=True)
class StoreTimeouts:
    """How long an S3 store's endpoint may take: to accept a connection, to answer once connected; and how many
    times a request is tried (the start-up probe tries once, so a hung endpoint fails within the two timeouts)."""

    connect_s: float = 3.0
    read_s: float = 10.0
    max_attempts: int = 3


class StoreBackend(Protocol):
    is_local: bool  # True: checking a version exists is cheap enough for every load

    @property
    def location(self) -> str:
        """The path or URI this backend was opened on (logs, error messages, reopening)."""
        ...

    def recover(self) -> int:
        """At start-up: discard what killed writers left behind; return how many leftovers were removed."""
        ...

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """Held around a registration or deletion (a cross-process lock for the directory; nothing on S3)."""
        ...

    def listing(self) -> dict[str, list[int]]:
        """Every task's committed versions, ascending (one pass over the store)."""
        ...

    def versions(self, task_id: str) -> list[int]:
        """One task's committed versions, ascending; [] if it has none."""
        ...

    def stage(self, task_id: str, parsed: ParsedAdapter, created_at: str) -> Any:
        """Write a version's bytes durably, not yet visible; the result is opaque, for `commit` and `discard`."""
        ...

    def commit(self, task_id: str, staged: Any) -> tuple[int, bool]:
        """Make a staged version visible, atomically, as the next never-used number: (version, created)."""
        ...

    def discard(self, staged: Any) -> None:
        """Remove a staged version that was not committed (a no-op once committed)."""
        ...

    def drop_versions(self, task_id: str, versions: list[int]) -> None:
        """Remove old versions (replaced ones), each atomically: a reader sees a whole version or none."""
        ...

    def delete(self, task_id: str) -> bool:
        """Remove every version, leaving a tombstone so numbers are never reused; False if there was none."""
        ...

    def read(
        self,
        task_id: str,
        version: int,
        fingerprint: BackboneFingerprint,
        limits: StoreLimits,
        manifest: dict[str, Any] | None = None,
    ) -> TaskArtifact:
        """Load and re-validate a version: TaskNotFound if it is gone, InvalidTask if it is damaged. `manifest`: what
        the version's change feed entry carries (Change.manifest), if anything, so it need not be fetched."""
        ...

    def has_version(self, task_id: str, version: int) -> bool: ...

    def append_change(
        self, task_id: str, version: int | None, staged: Any = None, record: dict[str, Any] | None = None
    ) -> int:
        """Announce a write already made (a version, or a deletion: None) in the change feed; return its number.
        `staged`: what `stage` returned for that version, if this process wrote it (the entry may carry from it
        what readers would otherwise fetch); `record`: the version's record for readers of the same backbone and
        limits (changes.py), carried in the entry."""
        ...

    def change_seqs_after(self, seq: int) -> list[int]:
        """The numbers of the change feed's entries above `seq`, ascending (S3: one LIST when there are none)."""
        ...

    def read_change(self, seq: int) -> Change | None:
        """One entry of the change feed; None if it is gone (compacted) or is not a change."""
        ...

    def compact_changes(self, below: int, max_age_s: float) -> int:
        """Remove the feed's entries numbered below `below` and older than `max_age_s`; return how many."""
        ...

    def snapshot_names(self) -> list[str]:
        """The names of the index snapshots kept (snapshots.py), ascending."""
        ...

    def read_snapshot(self, name: str, max_bytes: int) -> bytes | None:
        """A snapshot's bytes; None if it is gone; InvalidTask if it is larger than `max_bytes`."""
        ...

    def write_snapshot(self, name: str, data: bytes) -> bool:
        """Create a snapshot whole (readers never see part of one); False if one of that name exists."""
        ...

    def remove_snapshot(self, name: str) -> None: ...

    def version_dir(self, task_id: str, version: int, limits: StoreLimits) -> Path:
        """A local PEFT adapter directory of a version (S3: downloaded into a local cache once)."""
        ...

    def probe(self) -> None:
        """List the store and write (then remove) a probe object: StoreError if either fails."""
        ...


def is_s3_uri(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(S3_SCHEME)


def check_location(location: str | Path) -> None:
    """StoreError for a location that reads as a URI but is not `s3://bucket/...`: it must not become a directory."""
    match = _URI_LIKE.match(str(location)) if isinstance(location, str) else None
    if match is not None and not location.startswith(S3_SCHEME):  # type: ignore[union-attr]
        scheme = match.group(1) or match.group(2)
        if scheme.lower() == "s3":
            raise StoreError(f"expected s3://bucket/prefix (lower-case s3, two slashes); found {location!r}")
        raise StoreError(f"expected a directory or s3://bucket/prefix; found the URI scheme {scheme!r} in {location!r}")


def open_backend(location: str | Path, timeouts: StoreTimeouts = StoreTimeouts()) -> StoreBackend:
    """A directory path (created if missing) or `s3://bucket/prefix` (checked: reachable, bucket exists)."""
    check_location(location)
    if is_s3_uri(location):
        from prompt_store.s3 import S3Backend  # boto3 is the optional `s3` extra

        return S3Backend.open(str(location), timeouts)
    from prompt_store.directory import DirectoryBackend

    return DirectoryBackend(Path(location))


def probe_store(location: str | Path, timeouts: StoreTimeouts) -> None:
    """Before anything else starts: the store opens, lists and takes a write (StoreError naming what failed)."""
    try:
        open_backend(location, timeouts).probe()
    except OSError as error:  # a directory that cannot be created, listed or written
        raise StoreError(f"{location}: expected a directory this process can list and write; found {error}") from error
