"""The S3 backend: `s3://bucket/prefix` on any S3-compatible service, for replicas that share no volume.

prefix/tasks/<id>/v000001.json          a version exists once this manifest does (created with If-None-Match: *)
prefix/data/<id>/<uuid>/<file>          its files, uploaded before the manifest, never modified
prefix/tombstones/<id>/v000007          a deleted task reached version 7: numbers continue from 8
prefix/changes/000000000042.json        the change feed: one entry per write (changes.py), If-None-Match: * too
prefix/snapshots/000000000042-<digest>.json.gz   every task's record at a feed position (snapshots.py)

A writer killed mid-upload leaves data no manifest names: never served, removed by `collect_garbage` (a polling
process runs it hourly: polling.py) once older than DATA_GRACE_S. Endpoint, region and credentials come from the
standard AWS environment variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or
boto3's other sources.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prompt_store.adapter import CONFIG_NAME, MODEL_NAME, StoreLimits, check_sizes, is_valid_task_id
from prompt_store.backend import StoreTimeouts
from prompt_store.changes import Change, change_name, decode_change, encode_change, parse_change_name
from prompt_store.errors import InvalidTask, StoreError, StoreUnavailable, TaskNotFound
from prompt_store.layout import LABELS_NAME, parse_version_name, version_name
from prompt_store.types import BackboneFingerprint, TaskArtifact
from prompt_store.versions import ParsedAdapter, StoredVersion, record_fields, sha256_hex

logger = logging.getLogger(__name__)

# Unreferenced data younger than this may belong to a registration still uploading: garbage collection spares it.
DATA_GRACE_S = 3600.0
# A writer whose upload took longer than this gives up before committing, so its data cannot have been collected
# (far under DATA_GRACE_S: leaves room for clock skew between the collector and the S3 server).
MAX_STAGED_AGE_S = 600.0
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_CHANGE_BYTES = 64 * 1024
DOWNLOAD_THREADS = 4  # a version has 2 or 3 files; a few loads on different threads may overlap
_MAX_COMMIT_ATTEMPTS = 1000
PROBE_DIR = "probes"  # prefix/probes/<uuid>: written and removed by the start-up probe
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_MANIFEST_RE = re.compile(r"([^/]+)/(v\d{6,})\.json")
_CONFLICT_CODES = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


@dataclass(slots=True)
class StagedUpload:
    task_id: str
    data_id: str
    manifest: bytes
    started: float  # time.monotonic() before the first byte went up
    keys: list[str] = field(default_factory=list)
    is_committed: bool = False
    is_uncertain: bool = False  # the manifest's PUT failed in transit: S3 may have applied it, so keep the data


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix"); the prefix may be empty."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not _BUCKET_RE.fullmatch(bucket):
        raise StoreError(f"expected s3://bucket/prefix, a bucket of 3-63 characters a-z 0-9 . -; found {uri!r}")
    return bucket, prefix.strip("/")


class S3Backend:
    is_local = False  # checking a version exists costs a request: a cached artifact is trusted until the next poll

    def __init__(self, uri: str, client: Any) -> None:
        self.uri = uri
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.client = client
        self._cache_dir: tempfile.TemporaryDirectory[str] | None = None  # version_dir downloads
        self._newest_change = 0  # the newest feed entry seen: where an append starts looking for the feed's end
        self._downloads = ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="s3-download")  # a version's files

    @classmethod
    def open(cls, uri: str, timeouts: StoreTimeouts = StoreTimeouts()) -> S3Backend:
        """Connect and check the bucket; StoreUnavailable (naming the URI and endpoint) if that fails."""
        parse_s3_uri(uri)
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StoreError(f"{uri}: an s3:// store needs boto3 (pip install 'promptserve[s3]')") from None
        # fail fast on a dead endpoint (start-up, a lookup on the request path); boto3's standard mode retries
        config = Config(
            connect_timeout=timeouts.connect_s,
            read_timeout=timeouts.read_s,
            retries={"total_max_attempts": timeouts.max_attempts, "mode": "standard"},  # tries, the first included
        )
        backend = cls(uri, boto3.client("s3", config=config))
        backend.check_bucket()
        return backend

    @property
    def location(self) -> str:
        return self.uri

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def check_bucket(self) -> None:
        self._call("head_bucket", Bucket=self.bucket)

    def probe(self) -> None:
        self._call("list_objects_v2", Bucket=self.bucket, Prefix=self._key("tasks") + "/", MaxKeys=1)
        key = self._key(PROBE_DIR, uuid.uuid4().hex)
        self._put(key, b"promptserve start-up probe")
        self._remove([key])

    # ---- keys

    def _key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts] if self.prefix else parts)

    def manifest_key(self, task_id: str, version: int) -> str:
        return self._key("tasks", task_id, f"{version_name(version)}.json")

    def _data_key(self, task_id: str, data_id: str, name: str) -> str:
        return self._key("data", task_id, data_id, name)

    def _change_key(self, seq: int) -> str:
        return self._key("changes", change_name(seq))

    # ---- requests

    def _call(self, operation: str, **kwargs: Any) -> Any:
        """One S3 request; transport and server errors become StoreUnavailable naming the URI and endpoint."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(**kwargs)
        except ClientError as exc:
            if error_code(exc) in ("NoSuchKey", "404", "NotFound") and operation != "head_bucket":
                raise
            if error_code(exc) in _CONFLICT_CODES:
                raise
            raise StoreUnavailable(self._describe(operation, kwargs, exc)) from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(self._describe(operation, kwargs, exc)) from exc

    def _describe(self, operation: str, kwargs: dict[str, Any], exc: Exception) -> str:
        what = f"bucket {self.bucket!r} does not exist" if error_code(exc) in ("404", "NoSuchBucket") else str(exc)
        target = kwargs.get("Key", kwargs.get("Prefix", ""))
        return f"task store {self.uri} (endpoint {self.endpoint}): {f'{operation} {target}'.strip()} failed: {what}"

    def _get(self, key: str, max_bytes: int) -> bytes | None:
        """An object's bytes, None if it does not exist; InvalidTask if it is larger than `max_bytes`."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self._call("get_object", Bucket=self.bucket, Key=key)
        except ClientError:
            return None
        with contextlib.closing(response["Body"]) as body:
            if response["ContentLength"] > max_bytes:
                raise InvalidTask(f"{self.uri}: {key}: expected at most {max_bytes} bytes; found more")
            try:
                return bytes(body.read())
            except BotoCoreError as exc:  # a stalled or reset download: the store is unreachable, the data intact
                raise StoreUnavailable(self._describe("get_object", {"Key": key}, exc)) from exc

    def _put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Store an object; with `if_absent`, False if the key already exists (someone else created it)."""
        from botocore.exceptions import ClientError

        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self._call("put_object", Bucket=self.bucket, Key=key, Body=data, **extra)
        except ClientError as exc:
            if if_absent and error_code(exc) in _CONFLICT_CODES:
                return False
            raise StoreUnavailable(self._describe("put_object", {"Key": key}, exc)) from exc
        return True

    def _remove(self, keys: list[str]) -> None:
        for key in keys:  # one by one: DeleteObjects' checksum rules differ between S3-compatible servers
            self._call("delete_object", Bucket=self.bucket, Key=key)

    def _list(self, *parts: str, start_after: str = "") -> list[dict[str, Any]]:
        """Every object under prefix/<parts>/ (paginated), or only those after the name `start_after`."""
        return [item for page in self._pages(*parts, start_after=start_after) for item in page]

    def _pages(self, *parts: str, start_after: str = "") -> Iterator[list[dict[str, Any]]]:
        """The objects under prefix/<parts>/ a LIST page (1,000 keys) at a time, keys relative to it."""
        prefix = self._key(*parts) + "/"
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if start_after:
            kwargs["StartAfter"] = prefix + start_after
        while True:
            page = self._call("list_objects_v2", **kwargs)
            yield [{**item, "Key": item["Key"][len(prefix) :]} for item in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    # ---- the interface

    def recover(self) -> int:
        return self.collect_garbage(DATA_GRACE_S)

    def writing(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # conditional writes order writers; there is nothing to lock

    def listing(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = defaultdict(list)
        for item in self._list("tasks"):
            match = _MANIFEST_RE.fullmatch(item["Key"])
            version = parse_version_name(match.group(2)) if match else None
            if match and version is not None and is_valid_task_id(match.group(1)):  # skip foreign objects
                found[match.group(1)].append(version)
        return {task_id: sorted(versions) for task_id, versions in sorted(found.items())}

    def versions(self, task_id: str) -> list[int]:
        return self._versions_under(self._list("tasks", task_id))

    def tombstone(self, task_id: str) -> int:
        """The highest version a deleted incarnation of the task reached (0 if none)."""
        return max(self._versions_under(self._list("tombstones", task_id), suffix=""), default=0)

    @staticmethod
    def _versions_under(items: list[dict[str, Any]], suffix: str = ".json") -> list[int]:
        found = (parse_version_name(item["Key"].removesuffix(suffix)) for item in items)
        return sorted(version for version in found if version is not None)

    def stage(self, task_id: str, parsed: ParsedAdapter, created_at: str) -> StagedUpload:
        files = {CONFIG_NAME: parsed.config_bytes, MODEL_NAME: parsed.model_bytes}
        if parsed.labels_bytes is not None:
            files[LABELS_NAME] = parsed.labels_bytes
        data_id = uuid.uuid4().hex
        manifest = {**record_fields(task_id, parsed, created_at), "data": data_id,
                    "files": {name: sha256_hex(data) for name, data in files.items()}}  # fmt: skip
        staged = StagedUpload(task_id, data_id, json.dumps(manifest, indent=2).encode(), time.monotonic())
        for name, data in files.items():
            staged.keys.append(self._data_key(task_id, data_id, name))
            self._put(staged.keys[-1], data)
        return staged

    def commit(self, task_id: str, staged: StagedUpload) -> tuple[int, bool]:
        if time.monotonic() - staged.started > MAX_STAGED_AGE_S:
            raise StoreError(f"{self.uri}: uploading task {task_id!r} took over {MAX_STAGED_AGE_S:.0f} s; retry")
        for _ in range(_MAX_COMMIT_ATTEMPTS):
            # Versions before the tombstone: a delete writes its tombstone before removing manifests, so if this
            # listing misses a deleted version, the tombstone read after it has it.
            existing = self.versions(task_id)
            version = max([*existing, self.tombstone(task_id)]) + 1
            if self._create_manifest(task_id, version, staged):
                staged.is_committed = True
                return version, not existing
        raise StoreError(f"could not commit a version of task {task_id!r} after {_MAX_COMMIT_ATTEMPTS} attempts")

    def _create_manifest(self, task_id: str, version: int, staged: StagedUpload) -> bool:
        """Create version `version` with this upload's manifest; False if another writer holds the number.

        A PUT whose reply was lost is retried by botocore and then fails its condition against itself: a taken
        number that holds this very manifest (its upload id is unique) is ours."""
        key, manifest = self.manifest_key(task_id, version), staged.manifest
        try:
            return self._put(key, manifest, if_absent=True) or self._get(key, MAX_MANIFEST_BYTES) == manifest
        except StoreUnavailable:  # either request may have failed after the PUT was applied
            staged.is_uncertain = True
            raise

    def discard(self, staged: StagedUpload) -> None:
        if not staged.is_committed and not staged.is_uncertain:
            with contextlib.suppress(StoreError):  # garbage collection gets what is left
                self._remove(staged.keys)

    def drop_versions(self, task_id: str, versions: list[int]) -> None:
        for version in versions:
            manifest = self._read_manifest(task_id, version)
            self._remove([self.manifest_key(task_id, version)])  # the version is gone from here on
            if manifest is not None:
                self._remove_data(task_id, manifest)

    def delete(self, task_id: str) -> bool:
        versions = self.versions(task_id)
        if not versions:
            return False
        # A tombstone per number, never overwritten: two deletes racing cannot lower the floor.
        floor = max(*versions, self.tombstone(task_id))
        self._put(self._key("tombstones", task_id, version_name(floor)), b"")
        self.drop_versions(task_id, versions)
        older = [version for version in self._versions_under(self._list("tombstones", task_id), "") if version < floor]
        self._remove([self._key("tombstones", task_id, version_name(version)) for version in older])
        return True

    def _read_manifest(self, task_id: str, version: int) -> dict[str, Any] | None:
        data = self._get(self.manifest_key(task_id, version), MAX_MANIFEST_BYTES)
        if data is None:
            return None
        where = f"{self.uri}: {self.manifest_key(task_id, version)}"
        try:
            fields = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidTask(f"{where}: expected a JSON object; found malformed JSON ({exc})") from None
        if not is_manifest(fields):
            raise InvalidTask(f"{where}: expected a manifest with data, files and created_at; found {fields!r}")
        return dict(fields)

    def _remove_data(self, task_id: str, manifest: dict[str, Any]) -> None:
        self._remove([self._data_key(task_id, manifest["data"], name) for name in manifest["files"]])

    def read(
        self,
        task_id: str,
        version: int,
        fingerprint: BackboneFingerprint,
        limits: StoreLimits,
        manifest: dict[str, Any] | None = None,
    ) -> TaskArtifact:
        where = f"{self.uri}: {self.manifest_key(task_id, version)}"
        carried = manifest if is_manifest(manifest) else None  # from the version's feed entry: no GET (a damaged
        # entry's is ignored, so it cannot get a good version rejected)
        return self._read_stored(task_id, version, limits, carried).validate(fingerprint, limits, where)

    def _read_stored(
        self, task_id: str, version: int, limits: StoreLimits, manifest: dict[str, Any] | None = None
    ) -> StoredVersion:
        manifest = self._read_manifest(task_id, version) if manifest is None else manifest
        if manifest is None:
            raise TaskNotFound(task_id, version)
        files = self._read_files(task_id, version, manifest, limits)
        config, model = files[CONFIG_NAME], files[MODEL_NAME]
        check_sizes(len(config), len(model), limits)
        return StoredVersion(task_id, version, manifest, config, model, files.get(LABELS_NAME))

    def _read_files(
        self, task_id: str, version: int, manifest: dict[str, Any], limits: StoreLimits
    ) -> dict[str, bytes]:
        files: dict[str, bytes] = {}
        keys = {name: self._data_key(task_id, manifest["data"], name) for name in manifest["files"]}
        limit = {name: limits.max_model_bytes if name == MODEL_NAME else limits.max_config_bytes for name in keys}
        # at once, not one after another: a replica applying a replacement waits for one round trip, not three
        downloads = {name: self._downloads.submit(self._get, key, limit[name]) for name, key in keys.items()}
        for name, sha256 in manifest["files"].items():
            key, data = keys[name], downloads[name].result()
            if data is None:
                if not self.has_version(task_id, version):  # removed by a replacement or a delete meanwhile
                    raise TaskNotFound(task_id, version)
                raise InvalidTask(f"{self.uri}: {key}: missing, though version {version} of {task_id!r} names it")
            if sha256_hex(data) != sha256:
                raise InvalidTask(f"{self.uri}: {key}: expected sha256 {sha256}; found {sha256_hex(data)}")
            files[name] = data
        return files

    def has_version(self, task_id: str, version: int) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call("head_object", Bucket=self.bucket, Key=self.manifest_key(task_id, version))
        except ClientError:
            return False
        return True

    def version_dir(self, task_id: str, version: int, limits: StoreLimits) -> Path:
        if self._cache_dir is None:
            self._cache_dir = tempfile.TemporaryDirectory(prefix="promptserve-s3-")
        target = Path(self._cache_dir.name) / task_id / version_name(version)
        if target.is_dir():  # versions are immutable: a download stays right
            return target
        stored = self._read_stored(task_id, version, limits)
        staging = Path(tempfile.mkdtemp(dir=self._cache_dir.name))
        files = {CONFIG_NAME: stored.config_bytes, MODEL_NAME: stored.model_bytes, LABELS_NAME: stored.labels}
        for name, data in files.items():
            if data is not None:
                (staging / name).write_bytes(data)
        target.parent.mkdir(exist_ok=True)
        os.replace(staging, target)
        return target

    # ---- the change feed

    def append_change(
        self,
        task_id: str,
        version: int | None,
        staged: StagedUpload | None = None,
        record: dict[str, Any] | None = None,
    ) -> int:
        """Create the entry after the feed's end; a writer that loses the number to another tries the next one.
        `staged`: the upload that version `version` committed: its manifest goes in the entry, so readers skip
        that GET (the entry is created after the manifest and names the same bytes).

        A PUT whose reply was lost is retried by botocore, fails its condition against itself, and the change is
        appended again: a duplicate entry, which readers apply twice to the same effect."""
        manifest = json.loads(staged.manifest) if staged is not None and version is not None else None
        data, seq = encode_change(task_id, version, manifest, record), self._newest_change
        if len(data) > MAX_CHANGE_BYTES:  # readers refuse an entry that large: announce the version alone
            data = encode_change(task_id, version)
        for _ in range(_MAX_COMMIT_ATTEMPTS):
            seq = max(self.change_seqs_after(seq), default=seq) + 1
            if self._put(self._change_key(seq), data, if_absent=True):
                self._newest_change = max(self._newest_change, seq)
                return seq
        raise StoreError(f"could not append to the change feed of {self.uri} after {_MAX_COMMIT_ATTEMPTS} attempts")

    def change_seqs_after(self, seq: int) -> list[int]:
        found = (parse_change_name(item["Key"]) for item in self._list("changes", start_after=change_name(seq)))
        seqs = [number for number in found if number is not None]
        self._newest_change = max(self._newest_change, *seqs, 0)
        return seqs

    def read_change(self, seq: int) -> Change | None:
        try:
            data = self._get(self._change_key(seq), MAX_CHANGE_BYTES)
        except InvalidTask:  # far larger than any entry: not one
            return None
        return None if data is None else decode_change(seq, data)

    def compact_changes(self, below: int, max_age_s: float) -> int:
        now, num_removed = datetime.now(UTC), 0
        for page in self._pages("changes"):  # oldest first: stops at the first entry kept
            for item in page:
                seq = parse_change_name(item["Key"])
                if seq is None:
                    continue
                if seq >= below or (now - item["LastModified"]).total_seconds() < max_age_s:
                    return num_removed
                self._remove([self._change_key(seq)])
                num_removed += 1
        return num_removed

    # ---- index snapshots (snapshots.py)

    def snapshot_names(self) -> list[str]:
        return [item["Key"] for item in self._list("snapshots")]

    def read_snapshot(self, name: str, max_bytes: int) -> bytes | None:
        return self._get(self._key("snapshots", name), max_bytes)

    def write_snapshot(self, name: str, data: bytes) -> bool:
        return self._put(self._key("snapshots", name), data, if_absent=True)

    def remove_snapshot(self, name: str) -> None:
        self._remove([self._key("snapshots", name)])

    # ---- leftovers

    def collect_garbage(self, min_age_s: float) -> int:
        """Remove data no manifest names (killed writers, interrupted deletes) older than `min_age_s`; return how
        many uploads were removed. Reads manifests only of tasks with more uploads than versions."""
        uploads: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for item in self._list("data"):
            task_id, _, rest = item["Key"].partition("/")
            uploads[(task_id, rest.partition("/")[0])].append(item)
        listing = self.listing()
        num_uploads = defaultdict(int, {task_id: 0 for task_id in listing})
        for task_id, _ in uploads:
            num_uploads[task_id] += 1
        now = datetime.now(UTC)
        num_removed = 0
        for task_id, count in num_uploads.items():
            if count <= len(listing.get(task_id, [])):
                continue
            referenced = self._referenced_uploads(task_id, listing.get(task_id, []))
            for (owner, data_id), items in uploads.items():
                newest = max(item["LastModified"] for item in items)
                if owner == task_id and data_id not in referenced and (now - newest).total_seconds() >= min_age_s:
                    self._remove([self._data_key(task_id, data_id, item["Key"].rsplit("/", 1)[1]) for item in items])
                    num_removed += 1
        return num_removed

    def _referenced_uploads(self, task_id: str, versions: list[int]) -> set[str]:
        referenced = set()
        for version in versions:
            try:
                manifest = self._read_manifest(task_id, version)
            except InvalidTask:
                continue  # a damaged manifest is skipped when served too; its data goes once it is replaced
            if manifest is not None:
                referenced.add(manifest["data"])
        return referenced


def is_manifest(fields: Any) -> bool:
    """A manifest's fields, as a version's manifest object holds them (and its feed entry carries them)."""
    files = fields.get("files") if isinstance(fields, dict) else None
    return (
        isinstance(files, dict)
        and {CONFIG_NAME, MODEL_NAME} <= set(files)
        and set(files) <= {CONFIG_NAME, MODEL_NAME, LABELS_NAME}
        and isinstance(fields.get("data"), str)
        and isinstance(fields.get("created_at"), str)
    )


def error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
