"""The app against the fake engine, through Starlette's TestClient (lifespan included)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.settings import Settings
from tests.api.fake_engine import FakeEngine, adapter_config

ADMIN_TOKEN = "s3cret-admin-token"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's PROMPTSERVE_* variables must not leak into the settings under test."""
    for name in [name for name in os.environ if name.startswith("PROMPTSERVE_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def settings() -> Settings:
    return Settings(demo_tasks=False)


@pytest.fixture
def client(settings: Settings, engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine)) as test_client:
        yield test_client


@pytest.fixture
def admin_client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(demo_tasks=False, admin_token=ADMIN_TOKEN), engine)) as test_client:
        yield test_client


def upload(config: bytes | None = None, model: bytes = b"weights") -> dict[str, tuple[str, bytes, str]]:
    """The two multipart parts of a task upload (delete a key to leave a part out)."""
    return {
        "adapter_config": ("adapter_config.json", config or adapter_config(), "application/json"),
        "adapter_model": ("adapter_model.safetensors", model, "application/octet-stream"),
    }
