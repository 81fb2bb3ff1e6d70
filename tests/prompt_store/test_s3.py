"""What only the S3 backend has: conditional creates on a real server (SeaweedFS), start-up errors, damaged and
leftover objects, a writer SIGKILLed mid-upload, and the poll-interval window of a cached artifact."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from prompt_store.adapter import CONFIG_NAME, MODEL_NAME
from prompt_store.errors import StoreError, StoreUnavailable, TaskNotFound
from prompt_store.registry import TaskStore
from prompt_store.s3 import S3Backend
from prompt_store.types import BackboneFingerprint
from prompt_store.versions import parse_upload
from tests.fixtures import TinyBackbone
from tests.prompt_store.helpers import read_adapter
from tests.prompt_store.seaweed import BUCKET, SeaweedS3, free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]
# A backbone wide enough that one prompt-tuning adapter is 16 MiB: its upload takes long enough to be killed in.
BIG_FP = BackboneFingerprint("llama", hidden_size=16384, num_layers=1, num_attention_heads=1, num_key_value_heads=1,
                             head_dim=16384, vocab_size=16)  # fmt: skip


@pytest.fixture
def uri(s3_server: SeaweedS3) -> str:
    return s3_server.new_uri()


@pytest.fixture
def store(uri: str, llama_fp) -> TaskStore:
    return TaskStore(uri, llama_fp)


@pytest.fixture
def prompt_adapter(tiny_llama: TinyBackbone) -> tuple[bytes, bytes]:
    return read_adapter(tiny_llama.adapters["prompt_tuning"])


def backend_of(store: TaskStore) -> S3Backend:
    assert isinstance(store.backend, S3Backend)
    return store.backend


def keys_under(store: TaskStore, part: str) -> list[str]:
    backend = backend_of(store)
    listed = backend.client.list_objects_v2(Bucket=backend.bucket, Prefix=f"{backend.prefix}/{part}/")
    return sorted(item["Key"] for item in listed.get("Contents", []))


def test_conditional_create_of_existing_key_fails_with_412(s3_server: SeaweedS3):
    from botocore.exceptions import ClientError

    client, key = s3_server.client(), f"{s3_server.new_uri().rsplit('/', 1)[1]}/once.json"
    client.put_object(Bucket=BUCKET, Key=key, Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=BUCKET, Key=key, Body=b"second", IfNoneMatch="*")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"first"


def test_open_missing_bucket_fails_naming_uri_and_endpoint(s3_server: SeaweedS3, llama_fp):
    with pytest.raises(StoreUnavailable, match=r"s3://no-such-bucket/x .*endpoint http://127\.0\.0\.1.*not exist"):
        TaskStore("s3://no-such-bucket/x", llama_fp)


def test_open_unreachable_endpoint_fails_naming_uri_and_endpoint(s3_server, llama_fp, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(StoreUnavailable, match=rf"s3://{BUCKET}/x \(endpoint {endpoint}\)"):
        TaskStore(f"s3://{BUCKET}/x", llama_fp)


def test_open_uri_without_bucket_is_refused(llama_fp):
    with pytest.raises(StoreError, match="expected s3://bucket/prefix"):
        TaskStore("s3://", llama_fp)


def test_reopened_store_skips_version_with_damaged_data(store, prompt_adapter, caplog):
    store.register("task", *prompt_adapter)
    store.register("task", *prompt_adapter)
    backend = backend_of(store)
    manifest_object = backend.client.get_object(Bucket=backend.bucket, Key=backend.manifest_key("task", 2))
    manifest = json.loads(manifest_object["Body"].read())
    model_key = f"{backend.prefix}/data/task/{manifest['data']}/{MODEL_NAME}"
    damaged = bytearray(prompt_adapter[1])
    damaged[-1] ^= 0x01
    backend.client.put_object(Bucket=backend.bucket, Key=model_key, Body=bytes(damaged))
    with caplog.at_level(logging.WARNING, logger="prompt_store.registry"):
        reopened = TaskStore(store.location, store.fingerprint)
    assert reopened.get("task").version == 1
    assert "not serving version 2 of task 'task'" in caplog.text and "sha256" in caplog.text


def test_garbage_collection_removes_only_old_unreferenced_uploads(store, prompt_adapter):
    store.register("kept", *prompt_adapter)
    backend = backend_of(store)
    parsed = parse_upload(*prompt_adapter, store.fingerprint, store.limits)
    leftover = backend.stage("orphan", parsed, "2024-01-01T00:00:00Z")  # a writer that died before committing
    assert len(keys_under(store, "data")) == 4
    assert backend.collect_garbage(min_age_s=3600) == 0  # young: maybe a registration still uploading
    assert backend.collect_garbage(min_age_s=0) == 1
    assert keys_under(store, "data") == sorted(key for key in keys_under(store, "data") if "/kept/" in key)
    assert len(keys_under(store, "data")) == 2 and leftover.keys[0] not in keys_under(store, "data")
    assert store.load("kept").key == ("kept", 1)


def test_delete_leaves_one_tombstone_and_no_data(store, prompt_adapter):
    for _ in range(2):
        store.register("task", *prompt_adapter)
    store.delete("task")
    store.register("task", *prompt_adapter)
    store.delete("task")
    assert keys_under(store, "data") == [] and keys_under(store, "tasks") == []
    assert [key.rsplit("/", 1)[1] for key in keys_under(store, "tombstones")] == ["v000003"]
    assert store.register("task", *prompt_adapter)[0].version == 4


def test_cached_artifact_is_served_until_refresh_after_replacement_elsewhere(store, prompt_adapter):
    # The documented S3 window: a replacement elsewhere shows up here at the next poll, not at the next load.
    store.register("task", *prompt_adapter)
    other = TaskStore(store.location, store.fingerprint)
    for _ in range(3):
        store.register("task", *prompt_adapter)
    assert other.load("task").key == ("task", 1)
    assert other.refresh() and other.load("task").key == ("task", 4)


def test_version_dir_is_a_local_peft_copy(store, tiny_llama):
    record, _ = store.register_dir("task", tiny_llama.adapters["prompt_tuning"])
    version_dir = store.version_dir("task", record.version)
    for name in (CONFIG_NAME, MODEL_NAME):
        assert (version_dir / name).read_bytes() == (tiny_llama.adapters["prompt_tuning"] / name).read_bytes()
    assert store.version_dir("task", 1) == version_dir
    with pytest.raises(TaskNotFound):
        store.version_dir("task", 2)


def test_polling_survives_transient_errors(store, prompt_adapter, caplog, monkeypatch):
    other = TaskStore(store.location, store.fingerprint)
    change_seqs_after, failures = other.backend.change_seqs_after, []

    def flaky_feed(seq: int) -> list[int]:
        if len(failures) < 2:
            failures.append(1)
            raise StoreUnavailable("endpoint down for a moment")
        return change_seqs_after(seq)

    monkeypatch.setattr(other.backend, "change_seqs_after", flaky_feed)
    store.register("task", *prompt_adapter)
    with caplog.at_level(logging.ERROR, logger="prompt_store.registry"):
        other.start_polling(0.05)
        try:
            deadline = time.monotonic() + 5
            while "task" not in [record.task_id for record in other.list()] and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            other.stop_polling()
    assert [record.task_id for record in other.list()] == ["task"] and len(failures) == 2
    assert "refreshing the task store s3://" in caplog.text and "retrying" in caplog.text


class StalledBody:
    """A get_object body whose download times out after the headers came back (a stalled or reset transfer)."""

    def read(self) -> bytes:
        from botocore.exceptions import ReadTimeoutError

        raise ReadTimeoutError(endpoint_url="http://s3.example")

    def close(self) -> None:
        pass


def test_stalled_download_is_unavailable_and_never_rejects_the_version(store, prompt_adapter, monkeypatch):
    replica = TaskStore(store.location, store.fingerprint)
    store.register("task", *prompt_adapter)
    client = backend_of(replica).client
    get_object = client.get_object
    monkeypatch.setattr(client, "get_object", lambda **kwargs: {**get_object(**kwargs), "Body": StalledBody()})
    with pytest.raises(StoreUnavailable, match=r"get_object .*Read timeout"):
        replica.load("task")  # 503 on the request path, not a 500
    with pytest.raises(StoreUnavailable):
        replica.refresh()
    monkeypatch.setattr(client, "get_object", get_object)  # the endpoint is back: the task was not written off
    assert replica.load("task").key == ("task", 1)


Put = Callable[..., bool]


def conditional_puts_applied_then(store: TaskStore, monkeypatch, then: Callable[[Put, str, bytes], bool]) -> None:
    """Each conditional PUT (a version's manifest) reaches S3 and is applied; its caller sees `then(put, ...)`."""
    put = backend_of(store)._put

    def applied(key: str, data: bytes, *, if_absent: bool = False) -> bool:
        if not if_absent:
            return put(key, data)
        put(key, data, if_absent=True)
        return then(put, key, data)

    monkeypatch.setattr(backend_of(store), "_put", applied)


def test_manifest_put_retried_after_a_lost_reply_keeps_its_number(store, prompt_adapter, monkeypatch):
    # The reply was lost; botocore's retry then fails its own condition (412).
    conditional_puts_applied_then(store, monkeypatch, lambda put, key, data: put(key, data, if_absent=True))
    record, created = store.register("task", *prompt_adapter)
    assert (record.version, created) == (1, True) and backend_of(store).versions("task") == [1]


def test_manifest_put_failed_in_transit_keeps_the_upload(store, prompt_adapter, monkeypatch):
    # The PUT may have been applied before the endpoint went away: deleting the files could break a real version.
    def endpoint_gone(put: Put, key: str, data: bytes) -> bool:
        raise StoreUnavailable("connection reset")

    conditional_puts_applied_then(store, monkeypatch, endpoint_gone)
    with pytest.raises(StoreUnavailable):
        store.register("task", *prompt_adapter)
    assert TaskStore(store.location, store.fingerprint).load("task").key == ("task", 1)


def test_manifest_check_failed_in_transit_keeps_the_upload(store, prompt_adapter, monkeypatch):
    # The reply was lost, the retry got 412, and reading the number's manifest back failed: it may be ours.
    def unreadable(key: str, max_bytes: int) -> bytes | None:
        raise StoreUnavailable("connection reset")

    def reply_lost_then_endpoint_gone(put: Put, key: str, data: bytes) -> bool:
        monkeypatch.setattr(backend_of(store), "_get", unreadable)
        return put(key, data, if_absent=True)  # the retry's 412

    conditional_puts_applied_then(store, monkeypatch, reply_lost_then_endpoint_gone)
    with pytest.raises(StoreUnavailable):
        store.register("task", *prompt_adapter)
    monkeypatch.undo()
    assert TaskStore(store.location, store.fingerprint).load("task").key == ("task", 1)


def test_objects_of_invalid_task_ids_are_not_listed(store, prompt_adapter):
    store.register("good", *prompt_adapter)
    backend = backend_of(store)
    backend.client.put_object(Bucket=backend.bucket, Key=backend.manifest_key("Bad Name!", 1), Body=b"{}")
    assert backend.listing().keys() == {"good"}
    assert [record.task_id for record in TaskStore(store.location, store.fingerprint).list()] == ["good"]


# ---- a writer SIGKILLed mid-registration


@pytest.fixture(scope="module")
def big_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("big-adapter")
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 256,
              "token_dim": BIG_FP.hidden_size, "num_layers": 1, "num_attention_heads": 1,
              "num_transformer_submodules": 1}  # fmt: skip
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    tensor = torch.randn(256, BIG_FP.hidden_size) * 0.01  # [P, hidden]: 16 MiB of float32
    (directory / MODEL_NAME).write_bytes(save_safetensors({"prompt_embeddings": tensor}, metadata={"format": "pt"}))
    return directory


def start_writer(uri: str, adapter_dir: Path, pause: str) -> tuple[subprocess.Popen[str], list[str]]:
    fingerprint = json.dumps(dataclasses.asdict(BIG_FP))
    command = [sys.executable, "-m", "tests.prompt_store.s3_writer", uri, fingerprint, "big", str(adapter_dir), pause]
    writer = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(writer.stdout or []), daemon=True).start()
    return writer, lines


def wait_line(lines: list[str], text: str, writer: subprocess.Popen[str], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(text in line for line in lines):
        assert writer.poll() is None, f"the writer exited early: {lines}"
        assert time.monotonic() < deadline, f"no {text!r} from the writer: {lines}"
        time.sleep(0.001)


@pytest.mark.parametrize("moment", ["mid-upload", "before-commit"])
def test_sigkilled_writer_leaves_nothing_servable(uri, big_adapter: Path, moment: str):
    store = TaskStore(uri, BIG_FP)
    assert store.register_dir("big", big_adapter)[0].version == 1
    writer, lines = start_writer(uri, big_adapter, "commit" if moment == "before-commit" else "none")
    if moment == "mid-upload":
        wait_line(lines, MODEL_NAME, writer)  # the 16 MiB object is going up now
        time.sleep(0.02)
    else:
        wait_line(lines, "staged", writer)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)
    assert not any(line.startswith("acked") for line in lines), lines
    reopened = TaskStore(uri, BIG_FP)
    assert [record.key for record in reopened.list()] == [("big", 1)] and store.backend.versions("big") == [1]
    assert reopened.load("big").key == ("big", 1)
    assert backend_of(reopened).collect_garbage(min_age_s=0) == 1  # the killed writer's upload, never named
    record, created = store.register_dir("big", big_adapter)
    assert (record.version, created) == (2, False)  # nobody ever saw a version 2 before: a fresh number
    reopened = TaskStore(uri, BIG_FP)
    assert [r.key for r in reopened.list()] == [("big", 2)] and reopened.load("big", 1).key == ("big", 1)
