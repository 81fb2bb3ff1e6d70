"""POST /v1/generate_stream: the SSE format, early and late errors."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.fake_engine import FakeEngine, answer_of
from tests.api.helpers import events_of


@pytest.fixture(autouse=True)
def tasks(engine: FakeEngine) -> None:
    for task_id in ("a", "b"):
        engine.add_task(task_id)


def stream(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/generate_stream", json={"inputs": "hi", **body})


def test_stream_content_type_is_event_stream(client: TestClient) -> None:
    response = stream(client, task_id="a")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")


def test_stream_one_event_per_token_in_order(client: TestClient) -> None:
    events = events_of(stream(client, task_id="a", parameters={"max_new_tokens": 3}).text)
    tokens = [event["token"] for event in events if event["token"] is not None]
    assert [token["text"] for token in tokens] == list("a:i")
    assert all(set(token) >= {"id", "text"} for token in tokens)
    assert all(event["generated_text"] is None and event["details"] is None for event in events[:-1])


def test_stream_last_event_has_generated_text_and_details(client: TestClient) -> None:
    last = events_of(stream(client, task_id="a").text)[-1]
    assert last["generated_text"] == answer_of("a", "hi")
    assert last["details"]["finish_reason"] == "eos_token"
    assert (last["details"]["task_id"], last["details"]["task_version"]) == ("a", 1)
    assert "tokens" not in last["details"]


def test_stream_details_tokens_when_requested(client: TestClient) -> None:
    last = events_of(stream(client, task_id="a", parameters={"details": True, "max_new_tokens": 2}).text)[-1]
    assert [token["text"] for token in last["details"]["tokens"]] == ["a", ":"]


def test_stream_vote_ensemble_replays_answer_tokens(client: TestClient) -> None:
    events = events_of(stream(client, task_ids=["a", "b", "b"], parameters={"max_new_tokens": 3}).text)
    assert [event["token"]["text"] for event in events] == list("b:i")
    assert events[-1]["generated_text"] == "b:i"
    assert len(events[-1]["details"]["members"]) == 3


def test_stream_404_status_when_task_unknown(client: TestClient) -> None:
    response = stream(client, task_id="nope")
    assert response.status_code == 404
    assert response.json()["error_type"] == "not_found"


def test_stream_429_status_when_queue_full(client: TestClient, engine: FakeEngine) -> None:
    engine.queue_full = True
    response = stream(client)
    assert (response.status_code, response.headers["retry-after"]) == (429, "3")


def test_stream_error_event_when_engine_fails_midway(client: TestClient, engine: FakeEngine) -> None:
    engine.fail_after_tokens = 2
    response = stream(client, task_id="a")
    events = events_of(response.text)
    assert response.status_code == 200
    assert [event["token"]["text"] for event in events[:-1]] == ["a", ":"]
    assert events[-1]["error_type"] == "unavailable"
    assert "simulated" in events[-1]["error"]
