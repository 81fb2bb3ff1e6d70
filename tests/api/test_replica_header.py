"""Every response names the replica that served it (`X-Promptserve-Replica`): successes, errors and streams."""

from __future__ import annotations

import os
import socket

import pytest
from fastapi.testclient import TestClient

from server.api.app import REPLICA_HEADER, create_app
from server.api.settings import Settings
from tests.api.conftest import upload
from tests.api.fake_engine import FakeEngine


@pytest.fixture(autouse=True)
def task(engine: FakeEngine) -> None:
    engine.add_task("a")


def test_replica_header_defaults_to_hostname_and_pid(client: TestClient) -> None:
    assert client.get("/health").headers[REPLICA_HEADER] == f"{socket.gethostname()}-{os.getpid()}"


def test_replica_header_names_the_given_replica(settings: Settings, engine: FakeEngine) -> None:
    with TestClient(create_app(settings, engine, replica_id="promptserve#r1")) as client:
        assert client.get("/health").headers[REPLICA_HEADER] == "promptserve#r1"


def test_replica_header_is_sent_once(client: TestClient) -> None:
    assert len(client.get("/v1/tasks").headers.get_list(REPLICA_HEADER)) == 1


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/generate", {"inputs": "hi", "task_id": "a"}, 200),
        ("POST", "/v1/completions", {"prompt": "hi", "model": "fake/tiny"}, 200),
        ("POST", "/v1/generate", {"inputs": "hi", "task_id": "nope"}, 404),
        ("POST", "/v1/generate", {"inputs": 3}, 422),
        ("GET", "/no/such/route", None, 404),
        ("DELETE", "/health", None, 405),
    ],
)
def test_replica_header_on_success_and_errors(
    client: TestClient, method: str, path: str, body: object, status: int
) -> None:
    response = client.request(method, path, json=body)
    assert response.status_code == status
    assert response.headers[REPLICA_HEADER]


def test_replica_header_on_stream(client: TestClient) -> None:
    with client.stream("POST", "/v1/generate_stream", json={"inputs": "hi", "task_id": "a"}) as response:
        assert response.status_code == 200
        assert response.headers[REPLICA_HEADER]


def test_replica_header_on_engine_not_ready(client: TestClient, engine: FakeEngine) -> None:
    engine.ready = False
    response = client.get("/health")
    assert (response.status_code, bool(response.headers[REPLICA_HEADER])) == (503, True)


def test_replica_header_on_unexpected_failure(client: TestClient, engine: FakeEngine) -> None:
    engine.crash_with = RuntimeError("boom")
    response = client.post("/v1/generate", json={"inputs": "hi", "task_id": "a"})
    assert (response.status_code, bool(response.headers[REPLICA_HEADER])) == (500, True)


def test_replica_header_on_body_over_the_limit(engine: FakeEngine) -> None:
    app = create_app(Settings(demo_tasks=False, max_request_bytes=16), engine)
    with TestClient(app) as client:
        response = client.post("/v1/generate", json={"inputs": "x" * 64, "task_id": "a"})
    assert (response.status_code, bool(response.headers[REPLICA_HEADER])) == (413, True)


def test_replica_header_on_task_registration(client: TestClient) -> None:
    response = client.put("/v1/tasks/b", files=upload())
    assert (response.status_code, bool(response.headers[REPLICA_HEADER])) == (201, True)
