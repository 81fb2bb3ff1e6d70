"""End to end: `promptserve serve` in a subprocess on 127.0.0.1, driven by the Python client through a real port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from promptserve_client import Client, NotFoundError, UnavailableError
from tests.fixtures import TinyBackbone
from tests.live_server import free_port

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 90.0


def promptserve_command() -> list[str]:
    script = Path(sys.executable).with_name("promptserve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]


def wait_healthy(client: Client, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            if client.health().status == "ok":
                return
        except (httpx.HTTPError, UnavailableError):  # connection refused, then 503 while the model loads
            time.sleep(0.2)
    pytest.fail(f"server not healthy after {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def server(tiny_llama: TinyBackbone, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = tmp_path / "server.log"
    env = {name: value for name, value in os.environ.items() if not name.startswith("PROMPTSERVE_")}
    command = [*promptserve_command(), "serve", "--model", str(tiny_llama.path), "--store", str(tmp_path / "store"),
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning"]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        with Client(url, timeout=30.0) as client:
            wait_healthy(client, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_end_to_end_register_generate_stream_ensemble(server: str, tiny_llama: TinyBackbone) -> None:
    with Client(server, timeout=30.0) as client:
        assert client.info().model_type == "llama"
        assert client.register_task("soft", tiny_llama.adapters["prompt_tuning"]).version == 1
        assert client.register_task("prefix", tiny_llama.adapters["prefix"]).method == "prefix_tuning"
        assert {record.task_id for record in client.list_tasks()} == {"soft", "prefix"}

        answer = client.generate("hello", task_id="soft", max_new_tokens=5, details=True)
        assert answer.details is not None and answer.details.task_id == "soft"

        events = list(client.generate_stream("hello", task_id="soft", max_new_tokens=5))
        assert [e.token.id for e in events if e.token] == [t.id for t in answer.details.tokens or []]
        assert events[-1].generated_text == answer.generated_text

        ensemble = client.generate("hello", task_ids=["soft", "prefix"], ensemble="vote", max_new_tokens=4)
        assert ensemble.details is not None and len(ensemble.details.members or []) == 2

        client.delete_task("soft")
        with pytest.raises(NotFoundError):
            client.generate("hello", task_id="soft")
