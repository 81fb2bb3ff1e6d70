"""The durable registry: versions, deletes, listing, recovery of partial state and pick-up of other writers.

`store` runs each test on both backends (a directory and an S3 prefix on SeaweedFS); `dir_store` tests what only a
directory has (its files; test_s3.py has the S3 counterparts)."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from prompt_store import polling
from prompt_store.errors import InvalidTask, TaskNotFound
from prompt_store.lru import ArtifactLRU
from prompt_store.materialize import materialize
from prompt_store.registry import StoreEvent, TaskStore
from prompt_store.s3 import S3Backend
from prompt_store.types import Method
from tests.fixtures import TinyBackbone
from tests.prompt_store.helpers import read_adapter


@pytest.fixture
def store(store_location: str, llama_fp) -> TaskStore:
    return TaskStore(store_location, llama_fp)


@pytest.fixture
def dir_store(tmp_path: Path, llama_fp) -> TaskStore:
    return TaskStore(tmp_path / "store", llama_fp)


def reopen(store: TaskStore, fingerprint=None) -> TaskStore:
    return TaskStore(store.location, fingerprint or store.fingerprint)


@pytest.fixture
def prompt_adapter(tiny_llama: TinyBackbone) -> tuple[bytes, bytes]:
    return read_adapter(tiny_llama.adapters["prompt_tuning"])


@pytest.fixture
def prefix_adapter(tiny_llama: TinyBackbone) -> tuple[bytes, bytes]:
    return read_adapter(tiny_llama.adapters["prefix"])


def events_of(store: TaskStore) -> list[StoreEvent]:
    events: list[StoreEvent] = []
    store.add_listener(events.append)
    return events


def stored_names(store: TaskStore) -> list[str]:
    """Every file (directory) or object (S3) the store holds but its lock."""
    if isinstance(store.backend, S3Backend):
        backend = store.backend
        listed = backend.client.list_objects_v2(Bucket=backend.bucket, Prefix=backend.prefix + "/")
        return sorted(item["Key"] for item in listed.get("Contents", []))
    return sorted(str(path) for path in store.root.rglob("*") if path.is_file() and path.name != ".lock")


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_register_new_task_returns_created_record(store, prompt_adapter):
    record, created = store.register("sentiment", *prompt_adapter)
    assert created and record.task_id == "sentiment" and record.version == 1
    assert record.method is Method.PROMPT_TUNING and record.num_virtual_tokens == 5
    assert record.bytes == len(prompt_adapter[0]) + len(prompt_adapter[1])
    assert record.sha256 == hashlib.sha256(prompt_adapter[1]).hexdigest()
    created_at = datetime.fromisoformat(record.created_at.replace("Z", "+00:00"))
    assert record.created_at.endswith("Z") and created_at.tzinfo == UTC
    assert abs((datetime.now(UTC) - created_at).total_seconds()) < 60


def test_register_same_id_creates_next_version(store, prompt_adapter, prefix_adapter):
    store.register("task", *prompt_adapter)
    record, created = store.register("task", *prefix_adapter)
    assert not created and record.version == 2 and record.method is Method.PREFIX_TUNING
    assert store.get("task") == record and len(store) == 1


def test_register_writes_peft_layout_with_record(dir_store, prompt_adapter):
    store = dir_store
    store.register("task", *prompt_adapter)
    version_dir = store.version_dir("task", 1)
    assert version_dir == store.root / "tasks" / "task" / "v000001"
    assert sorted(path.name for path in version_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "record.json",
    ]
    assert (version_dir / "adapter_model.safetensors").read_bytes() == prompt_adapter[1]


def test_replaced_task_old_artifact_stays_usable(store, prompt_adapter, prefix_adapter, llama_fp):
    store.register("task", *prompt_adapter)
    old = store.load("task")
    for _ in range(3):
        store.register("task", *prefix_adapter)
    assert store.backend.versions("task") == [3, 4]  # v1 and v2 removed from the store
    task = materialize(old, llama_fp, "cpu", torch.float32)
    assert task.key == ("task", 1) and task.prompt_embeds is not None and task.prompt_embeds.shape == (5, 48)


def test_load_previous_version_after_replacement(store, prompt_adapter, prefix_adapter):
    store.register("task", *prompt_adapter)
    store.register("task", *prefix_adapter)
    assert store.load("task", 1).record.method is Method.PROMPT_TUNING
    assert store.load("task").key == ("task", 2)


def test_load_vanished_version_raises_not_found(store, prompt_adapter):
    for _ in range(3):
        store.register("task", *prompt_adapter)
    with pytest.raises(TaskNotFound) as info:
        store.load("task", 1)
    assert info.value.task_id == "task" and info.value.version == 1 and "version 1" in str(info.value)


def test_load_returns_validated_cpu_artifact(store, prefix_adapter, tiny_llama):
    store.register("task", *prefix_adapter)
    artifact = store.load("task")
    assert artifact.record == store.get("task") and artifact.config["peft_type"] == "PREFIX_TUNING"
    assert artifact.prompt_embeddings.device.type == "cpu" and artifact.prompt_embeddings.shape == (3, 64)


def test_delete_removes_every_version(store, prompt_adapter):
    store.register("task", *prompt_adapter)
    store.register("task", *prompt_adapter)
    store.delete("task")
    assert len(store) == 0 and store.list() == [] and store.backend.versions("task") == []
    for lookup in (store.get, store.load):
        with pytest.raises(TaskNotFound):
            lookup("task")


def test_delete_unknown_task_raises_not_found(store):
    with pytest.raises(TaskNotFound, match="'ghost' is not registered"):
        store.delete("ghost")


def test_register_after_delete_continues_version_numbering(store, prompt_adapter):
    # (task_id, version) keys the device caches: a reused number would serve the deleted tensors.
    store.register("task", *prompt_adapter)
    store.register("task", *prompt_adapter)
    store.delete("task")
    record, created = store.register("task", *prompt_adapter)
    assert created and record.version == 3
    assert reopen(store).register("task", *prompt_adapter)[0].version == 4


def test_list_is_sorted_by_task_id(store, prompt_adapter):
    for task_id in ["b", "C", "a", "a.1"]:
        store.register(task_id, *prompt_adapter)
    assert [record.task_id for record in store.list()] == ["C", "a", "a.1", "b"]


def test_get_unknown_task_raises_not_found(store):
    with pytest.raises(TaskNotFound):
        store.get("ghost")


@pytest.mark.parametrize("task_id", ["../escape", "a/b", "", ".."])
def test_lookup_with_invalid_id_raises_not_found(store, task_id):
    for lookup in (store.get, store.load, store.delete):
        with pytest.raises(TaskNotFound):
            lookup(task_id)


def test_register_invalid_task_id_writes_nothing(store, prompt_adapter):
    with pytest.raises(InvalidTask, match="task_id must match"):
        store.register("../escape", *prompt_adapter)
    assert stored_names(store) == []


def test_register_invalid_adapter_writes_nothing(store, prompt_adapter, gpt2_fp):
    with pytest.raises(InvalidTask):
        reopen(store, gpt2_fp).register("task", *prompt_adapter)
    assert stored_names(store) == []


def test_register_dir_refuses_pickle_only_adapter(store, tiny_llama, tmp_path):
    adapter_dir = tmp_path / "legacy"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_bytes(read_adapter(tiny_llama.adapters["prompt_tuning"])[0])
    (adapter_dir / "adapter_model.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(InvalidTask, match=r"only safetensors is read.*adapter_model\.bin"):
        store.register_dir("legacy", adapter_dir)


def test_version_dir_of_unknown_version_raises_not_found(store, prompt_adapter):
    store.register("task", *prompt_adapter)
    with pytest.raises(TaskNotFound):
        store.version_dir("task", 2)


def test_reopened_store_serves_same_records(store, prompt_adapter, prefix_adapter):
    store.register("a", *prompt_adapter)
    store.register("b", *prefix_adapter)
    store.register("b", *prompt_adapter)
    reopened = reopen(store)
    assert reopened.list() == store.list()
    assert torch.equal(reopened.load("b").prompt_embeddings, store.load("b").prompt_embeddings)


def test_recovery_discards_partial_writes(dir_store, prompt_adapter):
    store = dir_store
    store.register("kept", *prompt_adapter)
    staged = store.root / ".tmp" / "abc123"
    staged.mkdir()
    (staged / "adapter_config.json").write_bytes(prompt_adapter[0])
    (store.root / ".trash" / "old" / "v000001").mkdir(parents=True)
    (store.root / "tasks" / "empty").mkdir()
    reopened = TaskStore(store.root, store.fingerprint)
    assert [record.task_id for record in reopened.list()] == ["kept"]
    assert not any((store.root / ".tmp").iterdir()) and not any((store.root / ".trash").iterdir())
    assert not (store.root / "tasks" / "empty").exists()


def test_polling_discards_partial_writes_every_recover_interval(dir_store, prompt_adapter, monkeypatch):
    # A long-lived replica clears a killed writer's leftovers without a restart.
    monkeypatch.setattr(polling, "RECOVER_EVERY_S", 0.0)
    staged = dir_store.root / ".tmp" / "abc123"
    staged.mkdir()
    (staged / "adapter_config.json").write_bytes(prompt_adapter[0])
    dir_store.start_polling(0.02)
    try:
        deadline = time.monotonic() + 5
        while staged.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        dir_store.stop_polling()
    assert not staged.exists()


def test_recovery_skips_version_with_sha256_mismatch(dir_store, prompt_adapter, caplog):
    store = dir_store
    store.register("task", *prompt_adapter)
    store.register("task", *prompt_adapter)
    model_path = store.version_dir("task", 2) / "adapter_model.safetensors"
    damaged = bytearray(model_path.read_bytes())
    damaged[-1] ^= 0x01  # one flipped bit in the tensor data: still a valid, finite safetensors file
    model_path.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING, logger="prompt_store.registry"):
        reopened = TaskStore(store.root, store.fingerprint)
    assert reopened.get("task").version == 1
    assert "not serving version 2 of task 'task'" in caplog.text and "sha256" in caplog.text


def test_recovery_skips_version_failing_validation(store, tiny_gpt2, gpt2_fp, caplog):
    # A store written for another backbone: its versions are intact but do not fit this one.
    reopen(store, gpt2_fp).register("task", *read_adapter(tiny_gpt2.adapters["prefix"]))
    with caplog.at_level(logging.WARNING, logger="prompt_store.registry"):
        reopened = reopen(store)
    assert len(reopened) == 0 and "token_dim must be 16" in caplog.text


@pytest.mark.parametrize("missing", ["record.json", "adapter_config.json", "adapter_model.safetensors"])
def test_recovery_skips_version_with_missing_file(dir_store, prompt_adapter, missing):
    store = dir_store
    store.register("task", *prompt_adapter)
    (store.version_dir("task", 1) / missing).unlink()
    with pytest.raises(TaskNotFound):
        TaskStore(store.root, store.fingerprint).get("task")


def test_register_and_delete_notify_listeners(store, prompt_adapter):
    events = events_of(store)
    store.register("task", *prompt_adapter)
    store.register("task", *prompt_adapter)
    store.delete("task")
    assert events == [
        StoreEvent("registered", "task", 1),
        StoreEvent("registered", "task", 2),
        StoreEvent("deleted", "task", None),
    ]


def test_failing_listener_does_not_break_register(store, prompt_adapter):
    def broken(event: StoreEvent) -> None:
        raise RuntimeError("listener bug")

    store.add_listener(broken)
    events = events_of(store)
    assert store.register("task", *prompt_adapter)[0].version == 1
    assert events == [StoreEvent("registered", "task", 1)]


def test_refresh_picks_up_task_from_second_store(store, prompt_adapter):
    other = reopen(store)
    events = events_of(other)
    store.register("task", *prompt_adapter)
    assert other.refresh() and other.get("task") == store.get("task")
    assert not other.refresh()
    assert events == [StoreEvent("registered", "task", 1)]


def test_refresh_picks_up_replacement_from_second_store(store, prompt_adapter, prefix_adapter):
    store.register("task", *prompt_adapter)
    other = reopen(store)
    events = events_of(other)
    store.register("task", *prefix_adapter)
    assert other.refresh() and other.get("task").version == 2
    assert events == [StoreEvent("registered", "task", 2)]


def test_refresh_picks_up_deletion_from_second_store(store, prompt_adapter):
    store.register("task", *prompt_adapter)
    other = reopen(store)
    events = events_of(other)
    store.delete("task")
    assert other.refresh() and len(other) == 0
    assert events == [StoreEvent("deleted", "task", None)]


def test_polling_picks_up_tasks_within_interval(store, prompt_adapter):
    other = reopen(store)
    events = events_of(other)
    other.start_polling(0.05)
    try:
        store.register("task", *prompt_adapter)
        assert wait_for(lambda: StoreEvent("registered", "task", 1) in events, timeout_s=2)
        store.delete("task")
        assert wait_for(lambda: StoreEvent("deleted", "task", None) in events, timeout_s=2)
    finally:
        other.stop_polling()


def test_load_finds_task_registered_elsewhere_before_refresh(store, prompt_adapter):
    other = reopen(store)
    store.register("task", *prompt_adapter)
    assert other.load("task").key == ("task", 1)


def test_load_current_follows_replacement_elsewhere_after_old_versions_removed(dir_store, prompt_adapter):
    # A directory notices at load time; S3 trusts a cached artifact until the next poll (test_s3.py).
    store = dir_store
    store.register("task", *prompt_adapter)
    other = reopen(store)
    for _ in range(3):
        store.register("task", *prompt_adapter)
    assert other.get("task").version == 1  # stale until it polls
    assert other.load("task").key == ("task", 4)


def test_concurrent_threads_registering_same_task_get_distinct_versions(store, prompt_adapter):
    versions: list[int] = []

    def register_three() -> None:
        for _ in range(3):
            versions.append(store.register("shared", *prompt_adapter)[0].version)

    threads = [threading.Thread(target=register_three) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == list(range(1, 13)) and store.get("shared").version == 12


def test_artifact_lru_stays_within_entry_bound(store, prompt_adapter):
    lru = ArtifactLRU(max_entries=2)
    for task_id in ["a", "b", "c"]:
        store.register(task_id, *prompt_adapter)
        lru.put(store.load(task_id))
    assert len(lru) == 2 and lru.get(("a", 1)) is None and lru.get(("c", 1)) is not None
