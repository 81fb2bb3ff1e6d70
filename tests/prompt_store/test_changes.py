"""The change feed on both backends: a refresh reads only the entries after its position, a reader whose entries
were compacted away rescans, a store written before the feed loads, and a writer killed between its version and
its entry loses nothing (the safety-net rescan finds the version and announces it)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from prompt_store.adapter import StoreLimits
from prompt_store.changes import COMPACT_EVERY, RETENTION_S, Change, change_name
from prompt_store.directory import DirectoryBackend
from prompt_store.registry import StoreEvent, TaskStore
from prompt_store.s3 import S3Backend
from tests.fixtures import TinyBackbone
from tests.prompt_store.forkserver import ForkServer, wait_for
from tests.prompt_store.helpers import read_adapter
from tests.prompt_store.test_processes import fingerprint_json


@pytest.fixture
def store(store_location: str, llama_fp) -> TaskStore:
    return TaskStore(store_location, llama_fp)


@pytest.fixture
def prompt_adapter(tiny_llama: TinyBackbone) -> tuple[bytes, bytes]:
    return read_adapter(tiny_llama.adapters["prompt_tuning"])


def reopen(store: TaskStore) -> TaskStore:
    return TaskStore(store.location, store.fingerprint)


def events_of(store: TaskStore) -> list[StoreEvent]:
    events: list[StoreEvent] = []
    store.add_listener(events.append)
    return events


def refuse_listing(store: TaskStore, monkeypatch) -> None:
    def listing() -> dict[str, list[int]]:
        raise AssertionError("a refresh listed every task")

    monkeypatch.setattr(store.backend, "listing", listing)


def versions_asked(store: TaskStore, monkeypatch) -> list[str]:
    """Task ids whose versions the store lists from now on (one listing each)."""
    asked: list[str] = []
    versions = store.backend.versions

    def spy(task_id: str) -> list[int]:
        asked.append(task_id)
        return versions(task_id)

    monkeypatch.setattr(store.backend, "versions", spy)
    return asked


def drop_feed(store: TaskStore) -> None:
    """Remove every feed entry: the store as code from before the feed left it."""
    backend = store.backend
    if isinstance(backend, S3Backend):
        backend._remove([backend._change_key(seq) for seq in backend.change_seqs_after(0)])
    else:
        assert isinstance(backend, DirectoryBackend)
        for path in backend.layout.changes_dir.iterdir():
            path.unlink()


def test_refresh_rescans_only_the_changed_tasks(store, prompt_adapter, monkeypatch):
    for task_id in ("a", "b", "c"):
        store.register(task_id, *prompt_adapter)
    other = reopen(store)
    events = events_of(other)
    store.register("b", *prompt_adapter)
    store.delete("c")
    refuse_listing(other, monkeypatch)
    asked = versions_asked(other, monkeypatch)
    assert other.refresh()
    # The new version of b is read as its entry names it; only the deletion lists the task's versions.
    assert asked == ["c"] and [record.key for record in other.list()] == [("a", 1), ("b", 2)]
    assert events == [StoreEvent("registered", "b", 2), StoreEvent("deleted", "c", None)]
    assert not other.refresh() and asked == ["c"]


def test_announced_version_gone_lists_the_task(store, prompt_adapter, monkeypatch):
    store.register("task", *prompt_adapter)
    other = reopen(store)
    store.register("task", *prompt_adapter)
    store.backend.append_change("task", 7)  # an entry for a version that is not there (or no longer)
    asked = versions_asked(other, monkeypatch)
    assert other.refresh() and asked == ["task"] and other.get("task").version == 2


def test_refresh_skips_changes_the_index_already_has(store, prompt_adapter, monkeypatch):
    # The writer's own entries, read back by its own refresh, cost no listing.
    store.register("task", *prompt_adapter)
    store.delete("task")
    asked = versions_asked(store, monkeypatch)
    assert not store.refresh() and asked == []


def test_idle_refresh_is_one_s3_request(s3_server, llama_fp, prompt_adapter):
    store = TaskStore(s3_server.new_uri(), llama_fp)
    for i in range(30):
        store.register(f"task-{i}", *prompt_adapter)
    other = reopen(store)
    requests = s3_requests(other)
    assert not other.refresh() and not other.refresh()
    assert len(requests) == 2 and all("start-after=" in url for url in requests)


def s3_requests(store: TaskStore) -> list[str]:
    """The URLs of the S3 requests a store sends from now on."""
    requests: list[str] = []
    backend = store.backend
    assert isinstance(backend, S3Backend)
    backend.client.meta.events.register("before-send.s3", lambda request, **_: requests.append(request.url))
    return requests


def versions_read(store: TaskStore, monkeypatch) -> list[tuple[str, int]]:
    """The versions the store reads (and validates) from now on."""
    read: list[tuple[str, int]] = []
    backend_read = store.backend.read

    def spy(task_id: str, version: int, *args: object) -> object:
        read.append((task_id, version))
        return backend_read(task_id, version, *args)

    monkeypatch.setattr(store.backend, "read", spy)
    return read


def test_replacement_is_installed_from_its_entry_and_read_at_first_load(store, prompt_adapter, monkeypatch):
    store.register("task", *prompt_adapter)
    other = reopen(store)
    record, _ = store.register("task", *prompt_adapter)
    read = versions_read(other, monkeypatch)
    assert other.refresh() and other.get("task") == record and read == []  # the writer's record, as it validated it
    assert other.load("task").record == record and read == [("task", 2)]  # read and validated at its first load


def test_entry_of_another_backbone_or_limits_is_read(store, prompt_adapter, monkeypatch):
    store.register("task", *prompt_adapter)
    other = TaskStore(store.location, store.fingerprint, StoreLimits(max_virtual_tokens=32))
    store.register("task", *prompt_adapter)
    read = versions_read(other, monkeypatch)
    assert other.refresh() and other.get("task").version == 2 and read == [("task", 2)]  # not validated against these


def test_version_announced_then_damaged_is_refused_at_first_load(tmp_path, llama_fp, prompt_adapter, caplog):
    store = TaskStore(str(tmp_path), llama_fp)
    store.register("task", *prompt_adapter)
    other = reopen(store)
    store.register("task", *prompt_adapter)
    model_path = store.version_dir("task", 2) / "adapter_model.safetensors"
    damaged = bytearray(model_path.read_bytes())
    damaged[-1] ^= 0x01
    model_path.write_bytes(bytes(damaged))
    assert other.refresh() and other.get("task").version == 2  # installed from the entry, not read yet
    with caplog.at_level(logging.WARNING, logger="prompt_store.registry"):
        assert other.load("task").record.version == 1  # the older version served
    assert "not serving version 2 of task 'task'" in caplog.text and "sha256" in caplog.text
    assert other.get("task").version == 1 and model_path.exists()  # refused here, never removed from the store


def test_s3_replacement_is_two_requests_and_its_files_one_load(s3_server, llama_fp, prompt_adapter):
    # The entry carries the record: a LIST of the feed and the entry; the first load reads the version's manifest,
    # then its two files at once.
    store = TaskStore(s3_server.new_uri(), llama_fp)
    store.register("task", *prompt_adapter)
    other = reopen(store)
    store.register("task", *prompt_adapter)
    requests = s3_requests(other)
    assert other.refresh() and other.get("task").version == 2
    assert len(requests) == 2 and not any("/tasks/" in url for url in requests), requests
    del requests[:]
    assert other.load("task").record == store.load("task").record
    assert len(requests) == 3, requests


def test_s3_damaged_manifest_in_an_entry_reads_the_version_s_own(s3_server, llama_fp, prompt_adapter):
    # An entry without a record this replica can use (here: removed) is read through the manifest it carries.
    store = TaskStore(s3_server.new_uri(), llama_fp)
    store.register("task", *prompt_adapter)
    other = reopen(store)
    record, _ = store.register("task", *prompt_adapter)
    backend = store.backend
    assert isinstance(backend, S3Backend)
    seq = max(backend.change_seqs_after(0))
    entry = json.loads(backend._get(backend._change_key(seq), 1 << 16) or b"")
    del entry["record"]
    entry["manifest"]["files"] = "not a manifest"
    backend._put(backend._change_key(seq), json.dumps(entry).encode())
    requests = s3_requests(other)
    assert other.refresh() and other.get("task") == record
    assert sum("/tasks/task/" in url for url in requests) == 1  # the manifest, fetched after all


def test_damaged_record_in_an_entry_reads_the_version(store, prompt_adapter, monkeypatch, caplog):
    store.register("task", *prompt_adapter)
    other = reopen(store)
    record, _ = store.register("task", *prompt_adapter)
    seq = max(store.backend.change_seqs_after(0))
    change = store.backend.read_change(seq)
    assert change is not None and change.record is not None
    read_change = store.backend.read_change
    damaged = replace(change, record={**change.record, "record": {**change.record["record"], "bytes": "many"}})
    monkeypatch.setattr(other.backend, "read_change", lambda n: damaged if n == seq else read_change(n))
    read = versions_read(other, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="prompt_store.registry"):
        assert other.refresh() and other.get("task") == record and read == [("task", 2)]
    assert f"ignoring the record in change feed entry {seq}: expected bytes of type int" in caplog.text


def test_writers_take_dense_distinct_numbers(store, prompt_adapter):
    writers = [reopen(store) for _ in range(3)]
    errors: list[BaseException] = []

    def register_some(writer: TaskStore, name: str) -> None:
        try:
            for i in range(4):
                writer.register(f"{name}-{i}", *prompt_adapter)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=register_some, args=(w, f"w{n}")) for n, w in enumerate(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    seqs = store.backend.change_seqs_after(0)
    assert seqs == list(range(1, 13))
    announced = sorted((change.task_id, change.version) for seq in seqs if (change := store.backend.read_change(seq)))
    assert announced == [(f"w{n}-{i}", 1) for n in range(3) for i in range(4)]


def test_reader_behind_compacted_entries_rescans_every_task(store, prompt_adapter, monkeypatch):
    store.register("a", *prompt_adapter)
    other = reopen(store)
    store.register("a", *prompt_adapter)
    store.register("b", *prompt_adapter)
    assert store.backend.compact_changes(below=3, max_age_s=0) == 2  # entries 1 and 2: `other` has not read 2
    listed: list[int] = []
    listing = other.backend.listing
    monkeypatch.setattr(other.backend, "listing", lambda: listed.append(1) or listing())
    assert other.refresh() and listed == [1]
    assert [record.key for record in other.list()] == [("a", 2), ("b", 1)]
    store.register("b", *prompt_adapter)
    assert other.refresh() and other.get("b").version == 2 and listed == [1]  # back on the feed


def test_compaction_keeps_young_entries_and_the_newest(store, prompt_adapter):
    for _ in range(3):
        store.register("task", *prompt_adapter)
    assert store.backend.compact_changes(below=3, max_age_s=3600) == 0
    assert store.backend.compact_changes(below=3, max_age_s=0) == 2
    assert store.backend.change_seqs_after(0) == [3]


def test_every_hundredth_entry_compacts_the_feed(store, prompt_adapter, monkeypatch):
    calls: list[tuple[int, float]] = []
    monkeypatch.setattr(store.backend, "compact_changes", lambda below, max_age_s: calls.append((below, max_age_s)))
    for version in range(1, COMPACT_EVERY - 1):
        store.backend.append_change("other", version)  # the feed alone: registering that many versions is slow
    store.register("task", *prompt_adapter)
    assert calls == []
    store.register("task", *prompt_adapter)
    assert calls == [(COMPACT_EVERY, RETENTION_S)]
    store.register("task", *prompt_adapter)
    assert len(calls) == 1


def test_unreadable_entry_makes_a_reader_rescan_once(store, prompt_adapter, monkeypatch):
    store.register("a", *prompt_adapter)
    other = reopen(store)
    store.register("b", *prompt_adapter)
    read_change = other.backend.read_change
    monkeypatch.setattr(other.backend, "read_change", lambda seq: None)  # damaged, foreign, or compacted meanwhile
    assert other.refresh() and other.get("b").version == 1
    monkeypatch.setattr(other.backend, "read_change", read_change)
    refuse_listing(other, monkeypatch)
    store.register("a", *prompt_adapter)
    assert other.refresh() and other.get("a").version == 2


def test_store_without_a_feed_loads_and_starts_one(store, prompt_adapter):
    store.register("old", *prompt_adapter)
    drop_feed(store)  # as a store written before the feed existed
    reader, writer = reopen(store), reopen(store)
    assert [record.key for record in reader.list()] == [("old", 1)]
    writer.register("old", *prompt_adapter)
    writer.register("new", *prompt_adapter)
    assert writer.backend.change_seqs_after(0) == [1, 2]
    assert reader.refresh() and [record.key for record in reader.list()] == [("new", 1), ("old", 2)]


def test_s3_feed_entries_are_created_once(s3_server, llama_fp):
    backend = TaskStore(s3_server.new_uri(), llama_fp).backend
    assert isinstance(backend, S3Backend)
    assert backend._put(backend._change_key(1), b"{}", if_absent=True)
    assert backend.append_change("task", 1) == 2  # number 1 was taken: the next one
    assert backend.read_change(2) == Change(2, "task", 1) and backend.read_change(1) is None
    entry = backend.client.get_object(Bucket=backend.bucket, Key=backend._change_key(2))["Body"].read()
    assert json.loads(entry) == {"format": 1, "task_id": "task", "version": 1}
    assert backend._change_key(2).endswith(f"/changes/{change_name(2)}")


def test_directory_entry_is_never_seen_half_written(tmp_path: Path, llama_fp):
    store = TaskStore(tmp_path / "store", llama_fp)
    backend = store.backend
    assert isinstance(backend, DirectoryBackend)
    (backend.layout.changes_dir / change_name(1)).write_text("taken")
    assert backend.append_change("task", None) == 2
    assert backend.read_change(2) == Change(2, "task", None) and backend.read_change(1) is None
    assert not any(backend.layout.tmp_dir.iterdir())


# ---- a writer SIGKILLed between its version and the version's feed entry


@pytest.fixture(scope="module")
def fork_server(s3_server) -> Iterator[ForkServer]:
    """Writer processes that inherit the S3 server's environment."""
    server = ForkServer()
    yield server
    server.close()


def test_killed_writer_version_is_announced_by_the_next_rescan(fork_server, store, tiny_llama, llama_fp):
    store.register("task", *read_adapter(tiny_llama.adapters["prompt_tuning"]))
    feed_only, polling = reopen(store), reopen(store)
    events = events_of(polling)
    args = (store.location, fingerprint_json(llama_fp), "task", str(tiny_llama.adapters["prefix"]))
    writer = fork_server.spawn("register_unannounced", *args)
    assert fork_server.wait_lines(writer, 1) == ["stored task 2"]
    fork_server.kill(writer)
    # The reader tolerates the gap: it serves the version it knows, which the store still holds.
    assert not feed_only.refresh() and feed_only.load("task").key == ("task", 1)
    polling.start_polling(0.02, rescan_every_s=0.05)
    try:
        wait_for(lambda: StoreEvent("registered", "task", 2) in events, 5, "the safety-net rescan")
    finally:
        polling.stop_polling()
    # The rescan announced it: a replica that only reads the feed has it too, and so does a restart.
    assert feed_only.refresh() and feed_only.get("task").version == 2
    assert reopen(store).get("task").version == 2
