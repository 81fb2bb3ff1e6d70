"""Index snapshots on both backends: a replica starts from the newest one and the feed's entries after it (reading no
task it does not have to), falls back to reading every task when the snapshot is damaged, foreign or cut off from
the feed, loses no stored task either way, and refuses a version damaged since the snapshot when it first loads it."""

from __future__ import annotations

import gzip
import json
import logging
import threading

import pytest

from prompt_store import snapshots
from prompt_store.adapter import StoreLimits
from prompt_store.changes import COMPACT_EVERY
from prompt_store.directory import DirectoryBackend
from prompt_store.errors import TaskNotFound
from prompt_store.registry import TaskStore
from prompt_store.s3 import S3Backend
from prompt_store.snapshots import SnapshotError, decode_snapshot, encode_snapshot, snapshot_digest, snapshot_name
from prompt_store.types import Method, TaskRecord
from tests.fixtures import TinyBackbone
from tests.prompt_store.forkserver import wait_for
from tests.prompt_store.helpers import read_adapter
from tests.prompt_store.test_changes import drop_feed


@pytest.fixture
def store(store_location: str, llama_fp) -> TaskStore:
    return TaskStore(store_location, llama_fp)


@pytest.fixture
def dir_store(tmp_path, llama_fp) -> TaskStore:
    return TaskStore(tmp_path / "store", llama_fp)


@pytest.fixture
def prompt_adapter(tiny_llama: TinyBackbone) -> tuple[bytes, bytes]:
    return read_adapter(tiny_llama.adapters["prompt_tuning"])


class Reads:
    """What stores opened from now on read: whole-store listings and versions (every backend instance)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.listings = 0
        self.versions: list[tuple[str, int]] = []
        for backend in (DirectoryBackend, S3Backend):
            self._spy(monkeypatch, backend)

    def _spy(self, monkeypatch: pytest.MonkeyPatch, backend: type[DirectoryBackend] | type[S3Backend]) -> None:
        listing, read = backend.listing, backend.read

        def spy_listing(self_: object) -> dict[str, list[int]]:
            self.listings += 1
            return listing(self_)

        def spy_read(self_: object, task_id: str, version: int, *args: object, **kwargs: object) -> object:
            self.versions.append((task_id, version))
            return read(self_, task_id, version, *args, **kwargs)

        monkeypatch.setattr(backend, "listing", spy_listing)
        monkeypatch.setattr(backend, "read", spy_read)


def reopen(store: TaskStore) -> TaskStore:
    return TaskStore(store.location, store.fingerprint)


def keys(store: TaskStore) -> list[tuple[str, int]]:
    return [record.key for record in store.list()]


def test_replica_starts_from_the_snapshot_and_the_feed_after_it(store, prompt_adapter, monkeypatch):
    for task_id in ("a", "b", "c"):
        store.register(task_id, *prompt_adapter)
    assert store.snapshot() == 3
    store.register("b", *prompt_adapter)
    store.delete("c")
    store.register("d", *prompt_adapter)
    reads = Reads(monkeypatch)
    replica = reopen(store)
    # The snapshot's records as they are, then the feed's entries after it, with the records they carry: nothing read.
    assert keys(replica) == keys(store) == [("a", 1), ("b", 2), ("d", 1)]
    assert replica.list() == store.list()
    assert reads.listings == 0 and reads.versions == []
    assert replica.load("a").record == store.get("a")  # read and validated on first use


def test_a_snapshot_cut_off_from_the_feed_lists_the_store_and_reads_what_changed(store, prompt_adapter, monkeypatch):
    for task_id in ("a", "b"):
        store.register(task_id, *prompt_adapter)
    store.snapshot()
    store.register("b", *prompt_adapter)
    store.register("c", *prompt_adapter)
    assert store.backend.compact_changes(below=4, max_age_s=0) == 3  # entries 1-3: entry 3 came after the snapshot
    reads = Reads(monkeypatch)
    replica = reopen(store)
    assert keys(replica) == [("a", 1), ("b", 2), ("c", 1)]
    assert reads.listings == 1 and sorted(reads.versions) == [("b", 2), ("c", 1)]


def test_damaged_snapshot_is_skipped_and_every_task_read(store, prompt_adapter, monkeypatch, caplog):
    for task_id in ("a", "b"):
        store.register(task_id, *prompt_adapter)
    store.snapshot()
    name = store.backend.snapshot_names()[-1]
    store.backend.remove_snapshot(name)
    store.backend.write_snapshot(name, gzip.compress(b'{"format": 1, "position": 2, "tasks": "truncated'))
    reads = Reads(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="prompt_store.snapshots"):
        replica = reopen(store)
    assert keys(replica) == [("a", 1), ("b", 1)] and reads.listings == 1 and len(reads.versions) == 2
    assert f"not starting from the snapshot {name}" in caplog.text and "expected gzip'd JSON" in caplog.text


def test_snapshot_the_feed_does_not_reach_is_checked_against_a_listing(store, prompt_adapter, monkeypatch):
    for task_id in ("a", "b"):
        store.register(task_id, *prompt_adapter)
    store.snapshot()  # at entry 2
    store.register("b", *prompt_adapter)
    drop_feed(store)  # the feed removed (or the store restored from an older copy): numbers start again at 1
    store.register("c", *prompt_adapter)
    reads = Reads(monkeypatch)
    replica = reopen(store)
    assert keys(replica) == [("a", 1), ("b", 2), ("c", 1)]
    assert reads.listings == 1 and sorted(reads.versions) == [("b", 2), ("c", 1)]


def test_snapshot_of_other_limits_is_ignored(store, prompt_adapter, monkeypatch):
    store.register("a", *prompt_adapter)
    store.snapshot()
    reads = Reads(monkeypatch)
    replica = TaskStore(store.location, store.fingerprint, StoreLimits(max_virtual_tokens=8))
    assert keys(replica) == [("a", 1)] and reads.listings == 1  # its records were not validated against these
    assert reopen(store) and reads.listings == 1  # the snapshot is still there for replicas it fits


def test_version_damaged_after_the_snapshot_is_refused_on_first_load(dir_store, prompt_adapter, caplog):
    store = dir_store
    store.register("task", *prompt_adapter)
    store.snapshot()
    model_path = store.version_dir("task", 1) / "adapter_model.safetensors"
    damaged = bytearray(model_path.read_bytes())
    damaged[-1] ^= 0x01
    model_path.write_bytes(bytes(damaged))
    replica = reopen(store)
    assert keys(replica) == [("task", 1)]  # listed as the snapshot says, not read yet
    with caplog.at_level(logging.WARNING, logger="prompt_store.registry"), pytest.raises(TaskNotFound):
        replica.load("task")
    assert "not serving version 1 of task 'task'" in caplog.text and "sha256" in caplog.text
    assert keys(replica) == [] and model_path.exists()  # refused here, never removed from the store


def test_start_up_that_read_every_task_leaves_a_snapshot_above_the_threshold(store, prompt_adapter, monkeypatch):
    for task_id in ("a", "b"):
        store.register(task_id, *prompt_adapter)
    monkeypatch.setattr(snapshots, "SNAPSHOT_MIN_TASKS", 3)
    monkeypatch.setattr("prompt_store.registry.SNAPSHOT_MIN_TASKS", 3)
    reopen(store)
    assert store.backend.snapshot_names() == []
    store.register("c", *prompt_adapter)
    reopen(store)
    assert store.backend.snapshot_names() == [snapshot_name(3, snapshot_digest(store.fingerprint, store.limits))]
    reads = Reads(monkeypatch)
    assert len(reopen(store)) == 3 and reads.listings == 0 and reads.versions == []


def test_every_hundredth_entry_snapshots_before_it_compacts(store, prompt_adapter, monkeypatch):
    calls: list[tuple[int, float]] = []
    monkeypatch.setattr(store.backend, "compact_changes", lambda below, max_age_s: calls.append((below, max_age_s)))
    store.register("task", *prompt_adapter)
    for version in range(2, COMPACT_EVERY):
        store.backend.append_change("other", version)  # the feed alone: registering that many versions is slow
    store.register("task", *prompt_adapter)
    assert [below for below, _ in calls] == [COMPACT_EVERY]
    reads = Reads(monkeypatch)
    assert keys(reopen(store)) == [("task", 2)] and reads.listings == 0 and reads.versions == []


def test_polling_replica_snapshots_on_its_maintenance_thread(store, prompt_adapter, monkeypatch):
    threads: list[str] = []

    def snapshot() -> int:
        threads.append(threading.current_thread().name)
        return 0

    monkeypatch.setattr(store, "snapshot", snapshot)
    for version in range(1, COMPACT_EVERY):
        store.backend.append_change("other", version)
    store.start_polling(interval_s=60)
    try:
        store.register("task", *prompt_adapter)  # entry 100
        wait_for(lambda: threads == ["task-store-rescan"], 10, "the snapshot on the maintenance thread")
    finally:
        store.stop_polling()


def test_old_snapshots_are_pruned(store, prompt_adapter):
    for _ in range(4):
        store.register("task", *prompt_adapter)
        store.snapshot()
    digest = snapshot_digest(store.fingerprint, store.limits)
    assert store.backend.snapshot_names() == [snapshot_name(3, digest), snapshot_name(4, digest)]


def test_s3_start_up_from_a_snapshot_is_a_few_requests(s3_server, llama_fp, prompt_adapter, monkeypatch):
    store = TaskStore(s3_server.new_uri(), llama_fp)
    for i in range(30):
        store.register(f"task-{i}", *prompt_adapter)
    store.snapshot()
    requests: list[str] = []
    call = S3Backend._call

    def spy(self: S3Backend, operation: str, **kwargs: object) -> object:
        requests.append(f"{operation} {kwargs.get('Key', kwargs.get('Prefix', ''))}")
        return call(self, operation, **kwargs)

    monkeypatch.setattr(S3Backend, "_call", spy)
    assert len(reopen(store)) == 30
    # the bucket's HEAD, a LIST of the snapshots, the newest's GET, a LIST of the feed after it: no task read
    assert len(requests) == 4 and not any("/tasks/" in request or "/data/" in request for request in requests)


RECORD = TaskRecord("task", 2, Method.PROMPT_TUNING, 4, 100, "0" * 64, "2026-01-01T00:00:00.000Z")


def test_snapshot_round_trips_records():
    created = "2026-01-01T00:00:00.000Z"
    labelled = TaskRecord("cls", 1, Method.LORA, 0, 10, "1" * 64, created, "SEQ_CLS", ("no", "yes"), 8)
    assert decode_snapshot(encode_snapshot(7, "d" * 16, [RECORD, labelled]), "d" * 16) == (7, [labelled, RECORD])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"digest": "e" * 16}, "expected digest dddddddddddddddd"),
        ({"position": -1}, "position -1"),
        ({"format": 2}, "expected a snapshot object of format 1; found 2"),
        ({"tasks": [{**RECORD.to_dict(), "version": "2"}]}, "expected version of type int"),
        ({"tasks": [{**RECORD.to_dict(), "method": "full"}]}, "a known method"),
        ({"tasks": [{**RECORD.to_dict(), "task_id": "../x"}]}, "a valid task id"),
        ({"tasks": [{**RECORD.to_dict(), "labels": [1]}]}, "expected labels null or a list of names"),
        ({"tasks": [{**RECORD.to_dict(), "rank": True}]}, "expected rank null or a count"),
    ],
)
def test_snapshot_that_is_not_one_is_refused_with_what_was_wrong(change, message):
    fields = {"format": 1, "position": 3, "digest": "d" * 16, "tasks": [RECORD.to_dict()]} | change
    with pytest.raises(SnapshotError, match=message):
        decode_snapshot(gzip.compress(json.dumps(fields).encode()), "d" * 16)
