"""The client CLI, run in process against the app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from promptserve_client import Client
from promptserve_client.cli import main
from tests.api.fake_engine import FakeEngine, answer_of


def run(client: Client, *argv: str) -> int:
    return main(list(argv), client=client)


def test_cli_tasks_add_prints_version(client: Client, adapter_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(client, "tasks", "add", "new", str(adapter_dir)) == 0
    assert "registered new version 1 (p_tuning, 6 virtual tokens" in capsys.readouterr().out


def test_cli_tasks_ls_table(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(client, "tasks", "ls") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["TASK_ID", "VERSION", "METHOD"]
    assert [line.split()[0] for line in lines[1:]] == ["a", "b"]


def test_cli_tasks_ls_json(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(client, "tasks", "ls", "--json") == 0
    assert [record["task_id"] for record in json.loads(capsys.readouterr().out)] == ["a", "b"]


def test_cli_tasks_rm(client: Client, engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(client, "tasks", "rm", "a") == 0
    assert "a" not in engine.tasks


def test_cli_generate_prints_text(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(client, "generate", "hello", "--task", "a") == 0
    assert capsys.readouterr().out == answer_of("a", "hello") + "\n"


def test_cli_generate_stream_prints_tokens(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(client, "generate", "hello", "--task", "a", "--stream", "--max-new-tokens", "3") == 0
    assert capsys.readouterr().out == "a:o\n"


def test_cli_generate_ensemble_with_details(
    client: Client, engine: FakeEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(client, "generate", "hi", "--tasks", "a,b", "--ensemble", "mean", "--details") == 0
    out = capsys.readouterr().out
    text, _, details = out.partition("\n")
    assert text == answer_of("a", "hi")
    assert [m["task_id"] for m in json.loads(details)["members"]] == ["a", "b"]
    assert engine.requests[-1].task_ids == ("a", "b")


def test_cli_generate_passes_sampling_flags(client: Client, engine: FakeEngine) -> None:
    run(client, "generate", "x", "--do-sample", "--temperature", "0.5", "--seed", "3", "--stop", "\n")
    sampling = engine.requests[-1].sampling
    assert (sampling.do_sample, sampling.temperature, sampling.seed, sampling.stop) == (True, 0.5, 3, ("\n",))


def test_cli_error_exit_1_with_message(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(client, "generate", "x", "--task", "nope") == 1
    assert capsys.readouterr().err == "error (not_found): task 'nope' is not registered\n"


def test_cli_health_and_info(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(client, "health") == 0
    assert run(client, "info") == 0
    out = capsys.readouterr().out
    assert out.startswith("ok\n") and json.loads(out[3:])["model_id"] == "fake/tiny"


def test_cli_unreachable_server_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--url", "http://127.0.0.1:9", "--timeout", "2"]) == 1
    assert "no answer from http://127.0.0.1:9" in capsys.readouterr().err


def test_cli_url_from_env(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PROMPTSERVE_URL", "http://127.0.0.1:9")
    assert main(["health", "--timeout", "2"]) == 1
    assert "http://127.0.0.1:9" in capsys.readouterr().err
