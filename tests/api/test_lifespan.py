"""The lifespan builds the engine off the event loop: 503 until ready, failures reported, demo tasks hook."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from server.api import app as app_module
from server.api.app import create_app
from server.api.settings import Settings
from tests.api.fake_engine import FakeEngine

DEMO_STUB = "tests.api.demo_stub"


ShutdownRecorder = FakeEngine  # the fake counts its shutdowns


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_health_503_while_engine_loads_then_200() -> None:
    release = threading.Event()

    def slow_factory(settings: Settings) -> FakeEngine:
        release.wait(5)
        return FakeEngine()

    with TestClient(create_app(Settings(demo_tasks=False), engine_factory=slow_factory)) as client:
        loading = client.get("/health")
        assert loading.status_code == 503
        assert "loading" in loading.json()["error"]
        assert client.post("/v1/generate", json={"inputs": "x"}).status_code == 503
        release.set()
        wait_until(lambda: client.get("/health").status_code == 200)


def test_shutdown_while_the_engine_loads_does_not_wait_and_the_late_engine_is_stopped() -> None:
    release, engine = threading.Event(), ShutdownRecorder()

    def slow_factory(settings: Settings) -> FakeEngine:
        release.wait(30)
        return engine

    started = time.monotonic()
    with TestClient(create_app(Settings(demo_tasks=False), engine_factory=slow_factory)) as client:
        assert client.get("/health").status_code == 503
    assert time.monotonic() - started < 5, "the shutdown waited for the load"
    release.set()
    wait_until(lambda: engine.num_shutdowns == 1)


def test_engine_failure_reported_by_health_and_hook() -> None:
    failures: list[BaseException] = []

    def broken_factory(settings: Settings) -> FakeEngine:
        raise OSError("no such model: /nowhere")

    app = create_app(Settings(demo_tasks=False), engine_factory=broken_factory, on_engine_failure=failures.append)
    with TestClient(app) as client:
        wait_until(lambda: bool(failures))
        response = client.get("/health")
    assert response.status_code == 503
    assert "no such model" in response.json()["error"]
    assert isinstance(failures[0], OSError)


def test_a_failed_load_is_waited_for_before_the_process_exits() -> None:
    """After a failed start the loader thread still drops what it built (a model's tensors, freed in torch's C++)
    once the failure hook has stopped the server: the shutdown waits for it, or the interpreter's exit meets the
    thread in C++ and the process aborts ('terminate called without an active exception', status 134, not 1)."""
    cleaned = threading.Event()

    def broken_factory(settings: Settings) -> FakeEngine:
        raise OSError("no such model: /nowhere")

    def stop_then_clean(error: BaseException) -> None:
        time.sleep(0.3)  # the server's shutdown starts while the loader is still on its way out
        cleaned.set()

    app = create_app(Settings(demo_tasks=False), engine_factory=broken_factory, on_engine_failure=stop_then_clean)
    with TestClient(app):
        wait_until(lambda: app.state.promptserve.engine_error is not None)
    assert cleaned.is_set()


def test_built_engine_shut_down_at_exit() -> None:
    engine = ShutdownRecorder()
    with TestClient(create_app(Settings(demo_tasks=False), engine_factory=lambda settings: engine)) as client:
        wait_until(lambda: client.get("/health").status_code == 200)
    assert engine.num_shutdowns == 1


def test_given_engine_left_running_at_exit() -> None:
    engine = ShutdownRecorder()
    with TestClient(create_app(Settings(demo_tasks=False), engine)):
        pass
    assert engine.num_shutdowns == 0


def test_step_listener_attached_to_built_engine() -> None:
    engine = FakeEngine()
    with TestClient(create_app(Settings(demo_tasks=False), engine_factory=lambda settings: engine)) as client:
        wait_until(lambda: client.get("/health").status_code == 200)
    assert len(engine.listeners) == 1


@pytest.fixture
def demo_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "DEMO_MODULE", DEMO_STUB)


def serve_once(settings: Settings, engine: FakeEngine) -> None:
    with TestClient(create_app(settings, engine_factory=lambda settings: engine)) as client:
        wait_until(lambda: client.get("/health").status_code == 200)


@pytest.mark.usefixtures("demo_stub")
def test_demo_tasks_registered_when_store_empty() -> None:
    engine = FakeEngine()
    serve_once(Settings(demo_tasks=True), engine)
    assert list(engine.tasks) == ["demo-task"]


@pytest.mark.usefixtures("demo_stub")
def test_demo_tasks_skipped_when_store_has_tasks() -> None:
    engine = FakeEngine()
    engine.add_task("mine")
    serve_once(Settings(demo_tasks=True), engine)
    assert list(engine.tasks) == ["mine"]


@pytest.mark.usefixtures("demo_stub")
def test_demo_tasks_skipped_when_disabled() -> None:
    engine = FakeEngine()
    serve_once(Settings(demo_tasks=False), engine)
    assert engine.tasks == {}


@pytest.mark.usefixtures("demo_stub")
def test_demo_tasks_skipped_for_another_model() -> None:
    engine = FakeEngine()
    serve_once(Settings(demo_tasks=True, model="some/other-model"), engine)
    assert engine.tasks == {}


def test_demo_tasks_skipped_with_warning_when_module_absent(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(app_module, "DEMO_MODULE", "tests.api.no_such_demo_module")
    engine = FakeEngine()
    serve_once(Settings(demo_tasks=True), engine)
    assert engine.tasks == {}
    assert "no tests.api.no_such_demo_module module" in caplog.text


def test_demo_failure_fails_start_and_stops_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "DEMO_MODULE", "tests.api.broken_demo_stub")
    engine, failures = ShutdownRecorder(), []
    app = create_app(
        Settings(demo_tasks=True), engine_factory=lambda settings: engine, on_engine_failure=failures.append
    )
    with TestClient(app) as client:
        wait_until(lambda: bool(failures))
        assert "demo assets missing" in client.get("/health").json()["error"]
    assert engine.num_shutdowns == 1
