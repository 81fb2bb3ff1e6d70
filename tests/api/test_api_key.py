"""--api-key: every route but the health checks and /metrics needs one of the keys, as vLLM's flag does; the admin
token stays the key to writes. Tried with the official openai client against a real port."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import openai
import pytest

from server.api.app import create_app
from server.api.settings import Settings
from tests.api.conftest import ADMIN_TOKEN, upload
from tests.api.fake_engine import FakeEngine
from tests.live_server import serving

KEYS = ("key-one", "key-two")


@pytest.fixture
def url() -> Iterator[str]:
    settings = Settings(demo_tasks=False, api_key=",".join(KEYS), admin_token=ADMIN_TOKEN)
    engine = FakeEngine()
    engine.add_task("a")
    with serving(create_app(settings, engine), settings) as (base_url, _):
        yield base_url


def openai_client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_openai_client_with_a_wrong_key_gets_401_in_openais_shape(url: str) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        openai_client(url, "wrong").models.list()
    assert refused.value.status_code == 401
    assert refused.value.body == {  # the openai client hands over the body's `error` object
        "message": "expected one of the server's API keys; found a different bearer token",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }


@pytest.mark.parametrize("key", KEYS)
def test_openai_client_with_any_of_the_keys_is_served(url: str, key: str) -> None:
    client = openai_client(url, key)
    assert [model.id for model in client.models.list()]
    completion = client.completions.create(model=client.models.list().data[0].id, prompt="hi", max_tokens=2)
    assert completion.choices[0].text is not None


def test_native_routes_need_a_key_too(url: str) -> None:
    response = httpx.post(f"{url}/v1/generate", json={"inputs": "hi"})
    assert response.status_code == 401
    assert response.json() == {
        "error": "expected the header 'Authorization: Bearer <API key>'; found no bearer token",
        "error_type": "unauthorized",
    }
    assert response.headers["www-authenticate"] == "Bearer"
    for path in ("/info", "/v1/tasks", "/docs", "/openapi.json"):
        assert httpx.get(f"{url}{path}").status_code == 401, path
    assert httpx.get(f"{url}/v1/tasks", headers={"Authorization": "Bearer key-two"}).status_code == 200


def test_health_and_metrics_need_no_key(url: str) -> None:
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_an_api_key_cannot_write_and_the_admin_token_can(url: str) -> None:
    with_key = httpx.put(f"{url}/v1/tasks/b", files=upload(), headers={"Authorization": "Bearer key-one"})
    assert with_key.status_code == 401
    assert "admin token" in with_key.json()["error"]
    with_admin = httpx.put(f"{url}/v1/tasks/b", files=upload(), headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert with_admin.status_code == 201


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(url: str) -> None:
    body = b"x" * (64 * 1024 * 1024 + 1024 * 1024)  # over the upload limit: 413 if the body were looked at
    response = httpx.put(f"{url}/v1/tasks/b", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("settings", "warning"),
    [
        ({}, "no API key and no admin token: every route, task writes included, is open"),
        ({"api_key": "k"}, "task writes (PUT, DELETE /v1/tasks) are open to every API key"),
    ],
)
def test_open_writes_are_a_warning_at_start(
    caplog: pytest.LogCaptureFixture, settings: dict[str, str], warning: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="server.api.auth"):
        create_app(Settings(demo_tasks=False, **settings), FakeEngine())
    assert warning in caplog.text


def test_no_warning_with_an_admin_token(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="server.api.auth"):
        create_app(Settings(demo_tasks=False, api_key="k", admin_token=ADMIN_TOKEN), FakeEngine())
    assert caplog.text == ""
