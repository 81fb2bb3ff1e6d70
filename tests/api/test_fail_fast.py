"""`promptserve serve` as an operator runs it (a subprocess): a wrong setting stops the start before the model
loads, in one line naming the setting, its value and what was expected, with a non-zero exit status."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.live_server import free_port

ROOT = Path(__file__).resolve().parents[2]
START_S = 60.0  # a generous bound on the interpreter's start under a loaded machine; each case asserts its own


def serve(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout_s: float = START_S
) -> subprocess.CompletedProcess[str]:
    """`promptserve serve ARGS` at log level info (a model load would log), without the caller's PROMPTSERVE_*."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith("PROMPTSERVE_")}
    environ.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})})
    command = [sys.executable, "-m", "server.cli", "serve", "--log-level", "info", *args]
    return subprocess.run(command, cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout_s)


def the_one_line(result: subprocess.CompletedProcess[str]) -> str:
    """stderr is one line and nothing else happened: no model loaded, no server started."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "loading backbone" not in result.stderr and not result.stdout
    return lines[0]


@pytest.fixture
def silent_socket() -> Iterator[socket.socket]:
    """A listening socket that never accepts: the kernel's backlog completes connections, nothing answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


@pytest.fixture
def silent_endpoint(silent_socket: socket.socket) -> str:
    """An S3 endpoint that accepts connections and never answers."""
    return f"http://127.0.0.1:{silent_socket.getsockname()[1]}"


def connections_made(sock: socket.socket) -> int:
    """The connections waiting in a never-accepting socket's backlog (closed ones included)."""
    sock.setblocking(False)
    count = 0
    while True:
        try:
            sock.accept()[0].close()
        except BlockingIOError:
            return count
        count += 1


def s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "x"}


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another socket listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        yield taken.getsockname()[1]


@pytest.mark.slow
def test_port_in_use_fails_before_anything_loads(tmp_path: Path, taken_port: int) -> None:
    port = taken_port
    result = serve(["--port", str(port), "--store", str(tmp_path / "store")], tmp_path)
    assert result.returncode == 1
    line = the_one_line(result)
    assert line.startswith(f"promptserve serve: port={port} (--port, PROMPTSERVE_PORT): expected an address and port")
    assert "Address already in use" in line
    assert not (tmp_path / "store").exists(), "the store was opened after the port failed"


@pytest.mark.slow
def test_a_metrics_port_in_use_fails_before_the_model_loads(tmp_path: Path, taken_port: int) -> None:
    port = taken_port
    result = serve(["--port", str(free_port()), "--metrics-port", str(port), "--store", str(tmp_path / "s")], tmp_path)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    flags = "(--metrics-port, PROMPTSERVE_METRICS_PORT)"
    assert line.startswith(f"promptserve serve: metrics_port={port} {flags}: expected a port free to listen on")
    assert "Address already in use" in line and "loading backbone" not in result.stderr


@pytest.mark.slow
def test_the_metrics_port_serves_the_metrics_beside_the_server(tmp_path: Path) -> None:
    """Outside Ray too: --metrics-port was ignored there, so a scrape of the port found nothing listening."""
    port, metrics_port = free_port(), free_port()
    args = ["--port", str(port), "--metrics-port", str(metrics_port), "--store", str(tmp_path / "s"), "--no-self-check"]
    environ = {name: value for name, value in os.environ.items() if not name.startswith("PROMPTSERVE_")}
    command = [sys.executable, "-m", "server.cli", "serve", *args]
    process = subprocess.Popen(command, cwd=tmp_path, env={**environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + START_S
        while not is_healthy(f"http://127.0.0.1:{port}/health"):
            assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        families = {family.name for family in text_string_to_metric_families(text)}
        assert {"promptserve_ready", "promptserve_info", "promptserve_requests"} <= families
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def is_healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("store", ["gs://bucket/tasks", "S3://bucket/tasks", "s3:/bucket/tasks", "s3://B/tasks"])
def test_a_store_uri_that_is_not_s3_is_refused_not_made_a_directory(tmp_path: Path, store: str) -> None:
    result = serve(["--port", str(free_port()), "--store", store], tmp_path)
    assert result.returncode == 1
    line = the_one_line(result)
    assert line.startswith(f"promptserve serve: store_dir={store!r} (--store-dir, PROMPTSERVE_STORE_DIR): expected ")
    assert "s3://bucket/prefix" in line
    assert list(tmp_path.iterdir()) == [], "a directory was made of the URI"


@pytest.mark.slow
def test_a_missing_model_directory_is_no_such_directory(tmp_path: Path) -> None:
    result = serve(["--port", str(free_port()), "--store", str(tmp_path / "s"), "--model", "/nonexistent"], tmp_path)
    assert result.returncode == 1
    assert the_one_line(result) == (
        "promptserve serve: model='/nonexistent' (--model, PROMPTSERVE_MODEL): expected a model directory or a "
        "Hugging Face id; found no such directory"
    )


@pytest.mark.slow
def test_a_model_directory_without_a_tokenizer_is_one_line(tmp_path: Path) -> None:
    """A model saved with save_pretrained alone (no tokenizer.save_pretrained beside it): named before it loads."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    result = serve(["--port", str(free_port()), "--store", str(tmp_path / "s"), "--model", str(model)], tmp_path)
    assert result.returncode == 1
    assert the_one_line(result) == (
        f"promptserve serve: model={str(model)!r} (--model, PROMPTSERVE_MODEL): expected a tokenizer saved beside the "
        "model (tokenizer.json or tokenizer_config.json, as tokenizer.save_pretrained writes them); found none in it"
    )


@pytest.mark.slow
def test_the_checks_answer_before_torch_or_transformers_is_imported(tmp_path: Path) -> None:
    """Importing torch takes 2 s on an idle machine and 10 s on a busy one: the one line comes before it."""
    heavy = ("torch", "transformers", "safetensors.torch", "prompt_store.materialize")
    argv = ["serve", "--port", str(free_port()), "--store", str(tmp_path / "s"), "--model", "/nonexistent"]
    code = (
        f"import sys\nfrom server.cli import main\nstatus = main({argv!r})\n"
        f"print(status, [m for m in {heavy!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=START_S)
    assert result.stdout.strip() == "1 []", result.stdout + result.stderr


@pytest.mark.slow
def test_a_hub_id_that_does_not_resolve_is_one_line(tmp_path: Path) -> None:
    result = serve(["--port", str(free_port()), "--store", str(tmp_path / "s"), "--model", "no-org/no-model"], tmp_path)
    assert result.returncode == 1
    assert the_one_line(result).startswith(
        "promptserve serve: model='no-org/no-model' (--model, PROMPTSERVE_MODEL): expected a Hugging Face id that "
        "resolves; found "
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"PROMPTSERVE_MAX_BATCH_SIZE": "abc"}, "PROMPTSERVE_MAX_BATCH_SIZE: expected a valid integer; found 'abc'"),
        (
            {"PROMPTSERVE_MAX_BATCH_SIZ": "8"},
            "PROMPTSERVE_MAX_BATCH_SIZ: expected a promptserve setting; found no such setting "
            "(did you mean PROMPTSERVE_MAX_BATCH_SIZE?)",
        ),
    ],
)
def test_a_bad_variable_is_one_line_with_exit_status_2(tmp_path: Path, env: dict[str, str], line: str) -> None:
    result = serve([], tmp_path, env)
    assert result.returncode == 2
    assert the_one_line(result) == f"promptserve serve: {line}"


@pytest.mark.slow
def test_a_hung_store_endpoint_fails_within_its_timeouts(
    tmp_path: Path, silent_socket: socket.socket, silent_endpoint: str
) -> None:
    args = ["--port", str(free_port()), "--store", "s3://bucket/tasks", "--store-connect-timeout-s", "1",
            "--store-read-timeout-s", "1"]  # fmt: skip
    started = time.monotonic()
    result = serve(args, tmp_path, s3_env(silent_endpoint))
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    line = the_one_line(result)
    assert line.startswith("promptserve serve: store_dir='s3://bucket/tasks' (--store-dir, PROMPTSERVE_STORE_DIR): ")
    assert "timeout" in line.lower() and silent_endpoint in line
    imports = time_of([sys.executable, "-c", "import server.api.preflight, boto3"], cwd=ROOT)  # torch among them
    assert elapsed < imports + 10, f"{elapsed:.1f} s for 1 s timeouts, {imports:.1f} s of them imports"
    assert connections_made(silent_socket) == 1  # one try: botocore's max_attempts would have retried once


@pytest.mark.slow
def test_sigterm_while_the_store_hangs_exits_promptly(tmp_path: Path, silent_endpoint: str) -> None:
    args = ["--port", str(free_port()), "--store", "s3://bucket/tasks", "--store-read-timeout-s", "600"]
    environ = {name: value for name, value in os.environ.items() if not name.startswith("PROMPTSERVE_")}
    environ.update({"PYTHONPATH": str(ROOT), **s3_env(silent_endpoint)})
    command = [sys.executable, "-m", "server.cli", "serve", *args]
    process = subprocess.Popen(command, cwd=tmp_path, env=environ, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # the probe is waiting on the endpoint
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=5)
        assert time.monotonic() - sent < 5
    finally:
        process.kill()
        process.wait()


def time_of(command: list[str], cwd: Path) -> float:
    started = time.monotonic()
    subprocess.run(command, check=True, capture_output=True, cwd=cwd)
    return time.monotonic() - started
