"""The exposition of a real server, shared by the Grafana dashboard's and the alert rules' tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from tests.api.helpers import metric_samples
from tests.api.test_real_engine import adapter_files, real_settings, wait_healthy
from tests.fixtures import TinyBackbone


@pytest.fixture(scope="module")
def exported(tiny_llama: TinyBackbone, tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """The sample names of a real server's /metrics after one request to a task."""
    with TestClient(create_app(real_settings(tiny_llama, tmp_path_factory.mktemp("store")))) as client:
        wait_healthy(client)
        assert client.put("/v1/tasks/prefix", files=adapter_files(tiny_llama.adapters["prefix"])).status_code == 201
        body = {"inputs": "hello", "task_id": "prefix", "parameters": {"max_new_tokens": 3}}
        assert client.post("/v1/generate", json=body).status_code == 200
        yield {name for name, _ in metric_samples(client.get("/metrics").text)}
