"""Other processes on the same store directory: writers SIGKILLed mid-flight, and hot-loading without restart."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prompt_store.registry import StoreEvent, TaskStore
from prompt_store.types import BackboneFingerprint
from tests.fixtures import TinyBackbone
from tests.prompt_store.forkserver import ForkServer, wait_for


@pytest.fixture(scope="module")
def fork_server() -> Iterator[ForkServer]:
    server = ForkServer()
    yield server
    server.close()


def fingerprint_json(fp: BackboneFingerprint) -> str:
    return json.dumps(dataclasses.asdict(fp))


def kill_round(server: ForkServer, root: Path, fp: BackboneFingerprint, adapters: list[str], rng, name: str):
    """Writers on one directory, each SIGKILLed at a random moment after a few acknowledged writes."""
    pids = [server.spawn("loop", str(root), fingerprint_json(fp), f"{name}{n}", *adapters) for n in range(3)]
    for pid in pids:
        server.wait_lines(pid, 2)
    for pid in pids:
        time.sleep(rng.uniform(0.0, 0.1))
        server.kill(pid)
    return [line.split()[1:] for pid in pids for line in server.lines[pid] if line.startswith("acked")]


def test_sigkilled_writers_lose_no_acknowledged_task(fork_server, tmp_path: Path, tiny_llama: TinyBackbone, llama_fp):
    root, seed = tmp_path / "store", random.randrange(1 << 30)
    rng = random.Random(seed)
    adapters = [str(tiny_llama.adapters[kind]) for kind in ("prompt_tuning", "prefix", "p_tuning_lstm")]
    acked = [ack for name in "abc" for ack in kill_round(fork_server, root, llama_fp, adapters, rng, name)]
    recovered = TaskStore(root, llama_fp)
    newest: dict[str, tuple[int, str]] = {}
    for task_id, version, sha256 in acked:
        newest[task_id] = max(newest.get(task_id, (0, "")), (int(version), sha256))
    for task_id, (version, sha256) in newest.items():
        record = recovered.get(task_id)
        assert record.version >= version, f"seed {seed}: {task_id} v{version} acknowledged, v{record.version} found"
        assert record.version > version or record.sha256 == sha256, f"seed {seed}"
    # No partial state anywhere: every version directory on disk loads and validates.
    for task_id in recovered.layout.task_ids():
        for version in recovered.layout.versions(task_id):
            assert recovered.load(task_id, version).key == (task_id, version), f"seed {seed}"
    assert not any((root / ".tmp").iterdir())


def test_polling_picks_up_tasks_from_another_process(fork_server, tmp_path: Path, tiny_llama, llama_fp):
    root = tmp_path / "store"
    store = TaskStore(root, llama_fp)
    events: list[StoreEvent] = []
    store.add_listener(events.append)
    store.start_polling(0.05)
    try:
        args = (str(root), fingerprint_json(llama_fp))
        fork_server.wait_lines(fork_server.spawn("register", *args, "remote", str(tiny_llama.adapters["prefix"])), 2)
        wait_for(lambda: StoreEvent("registered", "remote", 1) in events, 2, "the registration to be picked up")
        assert store.load("remote").key == ("remote", 1)
        fork_server.wait_lines(fork_server.spawn("delete", *args, "remote"), 2)
        wait_for(lambda: StoreEvent("deleted", "remote", None) in events, 2, "the deletion to be picked up")
        assert len(store) == 0
    finally:
        store.stop_polling()
