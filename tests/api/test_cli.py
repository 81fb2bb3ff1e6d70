"""`promptserve`: serve's flags override the environment; the other commands go to the client's CLI."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from promptserve_client import cli as client_cli
from server import cli


def test_serve_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTSERVE_PORT", "9000")
    monkeypatch.setenv("PROMPTSERVE_MAX_BATCH_SIZE", "4")
    settings = cli.serve_settings(["--port", "9100", "--store", "/data/store", "--dtype", "bfloat16"])
    assert (settings.port, settings.engine.store_dir, settings.engine.dtype) == (9100, "/data/store", "bfloat16")
    assert settings.engine.max_batch_size == 4


def test_serve_without_model_uses_default_backbone() -> None:
    assert cli.serve_settings([]).engine.model is None


def test_serve_no_demo_tasks_flag() -> None:
    assert cli.serve_settings([]).demo_tasks is True
    assert cli.serve_settings(["--no-demo-tasks"]).demo_tasks is False


def test_serve_rejects_unknown_dtype() -> None:
    with pytest.raises(SystemExit):
        cli.serve_settings(["--dtype", "int3"])


@pytest.mark.parametrize("command", ["tasks", "generate", "classify", "score", "health", "info"])
def test_client_commands_delegate_with_their_args(monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    calls: list[tuple[list[str], str | None]] = []
    monkeypatch.setattr(client_cli, "main", lambda argv, prog=None: calls.append((argv, prog)) or 0)
    assert cli.main([command, "x", "--url", "http://h:1"]) == 0
    assert calls == [([command, "x", "--url", "http://h:1"], "promptserve")]


def test_every_client_command_is_a_promptserve_command() -> None:
    assert set(client_cli.COMMANDS) <= set(cli.COMMANDS)


def test_main_lists_commands_on_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


def test_main_exit_2_on_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


def test_serve_exits_1_when_model_fails_to_load(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["--model", str(tmp_path / "no-model"), "--store", str(tmp_path / "store"), "--port", str(port),
            "--log-level", "critical"]  # fmt: skip
    assert cli.serve(argv) == 1


def test_bench_runs_the_serving_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    """`promptserve bench` is benchmarks.serving: it refuses a remote URL before sending anything."""
    assert cli.main(["bench", "--url", "http://198.51.100.7:8000", "--num-requests", "1"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
