"""End to end: `promptserve serve` in a subprocess on 127.0.0.1 (one for the module), driven through a real port by
the Python client and the `promptserve` client commands."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from promptserve_client import Client, NotFoundError, UnavailableError, ValidationError
from server import cli
from tests.fixtures import TinyBackbone
from tests.live_server import free_port
from tests.nlu_fixtures import write_nlu_adapter

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


@pytest.fixture(scope="module")
def server(tiny_llama: TinyBackbone, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for the module: each test registers tasks of its own ids."""
    tmp_path = tmp_path_factory.mktemp("end-to-end")
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


def test_end_to_end_score_and_classify_on_a_causal_backbone(
    server: str, tiny_llama: TinyBackbone, tmp_path: Path
) -> None:
    yesno = write_nlu_adapter(tiny_llama.path, "seq", "prompt_tuning", tmp_path / "yesno", 4, seed=7)
    with Client(server, timeout=30.0) as client:
        assert "/v1/score" in client.info().endpoints
        client.register_task("scorer", tiny_llama.adapters["prefix"])
        scored = client.score("Is it true?", ["yes", "no way"], task_id="scorer")
        assert [s.candidate for s in scored.scores] == ["yes", "no way"]
        assert [s.num_tokens for s in scored.scores] == [3, 6]  # byte tokens
        assert scored.best == max(scored.scores, key=lambda s: s.logprob).candidate

        assert client.register_task("yesno", yesno, labels=["no", "yes"]).labels == ["no", "yes"]
        answer = client.classify(["great", "awful"], task_id="yesno", top_k=1)
        assert [len(p) for p in answer.predictions] == [1, 1] and answer.predictions[0][0].label in ("no", "yes")
        with pytest.raises(ValidationError, match="no trained classification head of its own") as refused:
            client.classify("hi")  # a causal LM's checkpoint has no head of its own
        assert refused.value.status == 400
        with pytest.raises(ValidationError, match="is a SEQ_CLS task: use /v1/classify"):
            client.score("hi", ["a"], task_id="yesno")


def test_end_to_end_promptserve_score_and_classify_commands(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["score", "Is it true?", "--candidates", "yes,no", "--url", server]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and sum(line.startswith("*") for line in lines) == 1
    assert cli.main(["classify", "hi", "--url", server]) == 1
    assert "error (validation): expected a task_id" in capsys.readouterr().err
