"""The admin token guards PUT and DELETE only; reads and generation stay open."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import ADMIN_TOKEN, upload
from tests.api.fake_engine import FakeEngine

GOOD = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_put_task_401_without_token(admin_client: TestClient) -> None:
    response = admin_client.put("/v1/tasks/a", files=upload())
    assert response.status_code == 401
    assert response.json()["error_type"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("header", [f"Bearer {ADMIN_TOKEN}x", "Bearer wrong", f"Basic {ADMIN_TOKEN}", "Bearer "])
def test_put_task_401_with_wrong_token(admin_client: TestClient, header: str) -> None:
    response = admin_client.put("/v1/tasks/a", files=upload(), headers={"Authorization": header})
    assert response.status_code == 401


def test_put_task_201_with_token(admin_client: TestClient) -> None:
    assert admin_client.put("/v1/tasks/a", files=upload(), headers=GOOD).status_code == 201


def test_put_task_401_before_parsing_body(admin_client: TestClient) -> None:
    headers = {"content-type": "multipart/form-data; boundary=b"}
    assert admin_client.put("/v1/tasks/a", content=b"garbage", headers=headers).status_code == 401


def test_delete_task_401_without_token(admin_client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("a")
    assert admin_client.delete("/v1/tasks/a").status_code == 401
    assert "a" in engine.tasks


def test_delete_task_204_with_token(admin_client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("a")
    assert admin_client.delete("/v1/tasks/a", headers=GOOD).status_code == 204


def test_reads_and_generation_open_without_token(admin_client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("a")
    assert admin_client.get("/v1/tasks").status_code == 200
    assert admin_client.get("/v1/tasks/a").status_code == 200
    assert admin_client.post("/v1/generate", json={"inputs": "x", "task_id": "a"}).status_code == 200


def test_writes_open_when_no_token_configured(client: TestClient) -> None:
    assert client.put("/v1/tasks/a", files=upload()).status_code == 201
