"""GET /health, /info; unknown routes and methods keep the error body."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.api.fake_engine import FakeEngine


def test_health_ok_when_engine_ready(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_health_503_when_engine_not_ready(client: TestClient, engine: FakeEngine) -> None:
    engine.ready = False
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json()["error_type"] == "unavailable"


def test_info_reports_every_api_field(client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("a")
    info = client.get("/info").json()
    expected = {"model_id", "model_type", "dtype", "device", "hidden_size", "num_layers", "num_key_value_heads",
                "head_dim", "vocab_size", "max_batch_size", "max_batch_tokens", "max_virtual_tokens", "version",
                "num_tasks", "kv_cache_tokens", "kv_block_size", "model_kind", "endpoints", "has_own_head"}  # fmt: skip
    assert set(info) == expected
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
