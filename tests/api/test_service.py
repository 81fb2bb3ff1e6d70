"""GET /health, /info; unknown routes and methods keep the error body."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from tests.api.fake_engine import FakeEngine

REPO = Path(__file__).resolve().parents[2]


def test_health_ok_when_engine_ready(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_health_503_when_engine_not_ready(client: TestClient, engine: FakeEngine) -> None:
    engine.ready = False
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json()["error_type"] == "unavailable"


def documented_info_fields() -> set[str]:
    """The field names docs/api.md lists for GET /info."""
    contract = (REPO / "docs" / "api.md").read_text()
    listing = contract[contract.index("- `GET /info` -> `{") :].split("}`", 1)[0]
    return set(re.findall(r'"(\w+)"', listing))


def test_info_answers_exactly_the_documented_fields(client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("a")
    info = client.get("/info").json()
    assert set(info) == documented_info_fields()
    assert info["num_tasks"] == 1 and info["model_kind"] == "causal"


def test_info_503_when_engine_not_ready(client: TestClient, engine: FakeEngine) -> None:
    engine.ready = False
    assert client.get("/info").status_code == 503


def test_unknown_route_404_with_error_body(client: TestClient) -> None:
    response = client.get("/v2/nothing")
    assert response.status_code == 404
    assert response.json()["error_type"] == "not_found"
    assert response.json()["error"] == "expected a route of the promptserve API (see /docs); found GET /v2/nothing"


def test_wrong_method_405_with_error_body(client: TestClient) -> None:
    response = client.post("/health")
    assert response.status_code == 405
    assert set(response.json()) == {"error", "error_type"}
    assert response.json()["error"] == "expected GET for /health; found POST"
    assert response.headers["allow"] == "GET"
