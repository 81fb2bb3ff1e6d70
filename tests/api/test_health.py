"""Health that means serving, on a real tiny engine whose forward pass is made to hang: /health turns 503 once the
engine has had work and completed no step for STALL_TIMEOUT_S, and /health/generate runs a token through it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.settings import Settings
from server.engine.async_engine import AsyncEngine, build_engine
from tests.api.fake_engine import FakeEngine
from tests.fixtures import TinyBackbone
from tests.live_server import serving

STALL_S = 1.0


@pytest.fixture
def real_engine(tiny_llama: TinyBackbone, tmp_path: Path) -> Iterator[AsyncEngine]:
    settings = Settings(model=str(tiny_llama.path), store_dir=str(tmp_path / "store"), device="cpu", poll_interval_s=0)
    engine = build_engine(settings.engine)
    yield engine
    engine.shutdown()


def hang_forward(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The next forward passes block until the returned event is set (a hung kernel, a stuck collective)."""
    release = threading.Event()
    run: Callable[..., Any] = engine.engine.run

    def hung(*args: Any) -> Any:
        release.wait(60)
        return run(*args)

    monkeypatch.setattr(engine.engine, "run", hung)
    return release


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_health_fails_while_a_forward_hangs_with_work_and_recovers(
    real_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(demo_tasks=False, stall_timeout_s=STALL_S, health_generate_timeout_s=2)
    app = create_app(settings, real_engine)
    with serving(app, settings) as (url, _):
        assert httpx.get(f"{url}/health").status_code == 200
        release = hang_forward(real_engine, monkeypatch)
        body = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}
        request = threading.Thread(target=lambda: httpx.post(f"{url}/v1/generate", json=body, timeout=90))
        request.start()
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 503)
        stalled = httpx.get(f"{url}/health")
        assert stalled.json()["error"].startswith(
            "expected the engine to complete a step within 1 s while it has work (STALL_TIMEOUT_S); found none for "
        )
        deep = httpx.get(f"{url}/health/generate")
        assert deep.status_code == 503 and "STALL_TIMEOUT_S" in deep.json()["error"]
        release.set()
        request.join(timeout=60)
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 200)


@pytest.mark.slow
def test_health_generate_runs_a_token_through_the_engine(real_engine: AsyncEngine) -> None:
    with TestClient(create_app(Settings(demo_tasks=False), real_engine)) as client:
        steps = real_engine.stats().num_steps
        response = client.get("/health/generate")
        assert response.status_code == 200, response.text
        assert response.json()["checked"].startswith("generated one token in ")
        assert real_engine.stats().num_steps > steps


@pytest.mark.slow
def test_health_generate_fails_when_the_probe_cannot_finish(
    real_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward that hangs before the stall limit is reached: the probe's own timeout answers."""
    release = hang_forward(real_engine, monkeypatch)
    try:
        app = create_app(Settings(demo_tasks=False, stall_timeout_s=0, health_generate_timeout_s=1), real_engine)
        with TestClient(app) as client:
            response = client.get("/health/generate")
        assert response.status_code == 503
        assert response.json()["error"] == (
            "expected the probe request within 1 s (HEALTH_GENERATE_TIMEOUT_S); found no step completed meanwhile"
        )
    finally:
        release.set()


def test_health_ignores_an_idle_engine_and_a_stall_under_the_limit() -> None:
    with TestClient(create_app(Settings(demo_tasks=False, stall_timeout_s=5), FakeEngine(stalled_s=4))) as client:
        assert client.get("/health").status_code == 200


def test_a_zero_stall_limit_never_fails_liveness() -> None:
    with TestClient(create_app(Settings(demo_tasks=False, stall_timeout_s=0), FakeEngine(stalled_s=1e6))) as client:
        assert client.get("/health").status_code == 200


def test_health_generate_answers_503_while_loading() -> None:
    with TestClient(create_app(Settings(demo_tasks=False), FakeEngine(ready=False))) as client:
        response = client.get("/health/generate")
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
