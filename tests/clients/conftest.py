"""The client against the app (fake engine) in process: TestClient for `Client`, ASGITransport for `AsyncClient`;
`canned_*` against a stand-in server for the routes the app does not serve yet."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from promptserve_client import AsyncClient, Client
from server.api.app import create_app
from server.api.settings import Settings
from tests.api.fake_engine import FakeEngine, adapter_config
from tests.clients.canned_server import CannedServer

ADMIN_TOKEN = "client-test-token"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("PROMPTSERVE_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def engine() -> FakeEngine:
    engine = FakeEngine()
    engine.add_task("a")
    engine.add_task("b")
    return engine


@pytest.fixture
def app(engine: FakeEngine) -> FastAPI:
    return create_app(Settings(demo_tasks=False, admin_token=ADMIN_TOKEN), engine)


@pytest.fixture
def client(app: FastAPI) -> Iterator[Client]:
    with TestClient(app) as http, Client(token=ADMIN_TOKEN, http_client=http) as promptserve:
        yield promptserve


@pytest.fixture
def anonymous(app: FastAPI) -> Iterator[Client]:
    with TestClient(app) as http, Client(http_client=http) as promptserve:
        yield promptserve


@pytest.fixture
async def async_client(app: FastAPI) -> AsyncIterator[AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield AsyncClient(token=ADMIN_TOKEN, http_client=http)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """The two files PEFT's save_pretrained writes (the fake engine reads only the config)."""
    (tmp_path / "adapter_config.json").write_bytes(adapter_config("P_TUNING", 6))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    return tmp_path


@pytest.fixture
def canned() -> CannedServer:
    return CannedServer()


@pytest.fixture
def canned_client(canned: CannedServer) -> Iterator[Client]:
    with httpx.Client(transport=httpx.MockTransport(canned), base_url="http://test") as http:
        yield Client(token=ADMIN_TOKEN, http_client=http)


@pytest.fixture
async def canned_async_client(canned: CannedServer) -> AsyncIterator[AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(canned), base_url="http://test") as http:
        yield AsyncClient(token=ADMIN_TOKEN, http_client=http)
