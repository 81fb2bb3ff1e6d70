"""A client that leaves aborts its request in the engine: driven at the ASGI level to control the disconnect."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from fastapi import FastAPI

from server.api.app import create_app
from server.api.settings import Settings
from tests.api.fake_engine import FakeEngine

Message = dict
TIMEOUT_S = 5.0


async def call_until(app: FastAPI, path: str, body: dict, leave_when: Callable[[list[Message]], bool]) -> list[Message]:
    """POST `body`; the client disconnects once `leave_when(sent messages)` holds. Returns what the app sent."""
    sent: list[Message] = []
    left = asyncio.Event()
    pending = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> Message:
        if pending:
            return pending.pop()
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    async def watch() -> None:
        while not leave_when(sent):
            await asyncio.sleep(0.002)
        left.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")], "client": ("127.0.0.1", 5000),
        "server": ("test", 80), "state": {},
    }  # fmt: skip
    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(app(scope, receive, send), TIMEOUT_S)
    watcher.cancel()
    return sent


def body_chunks(sent: list[Message]) -> list[bytes]:
    return [m["body"] for m in sent if m["type"] == "http.response.body" and m.get("body")]


def slow_app(engine: FakeEngine) -> FastAPI:
    engine.token_delay_s = 0.01
    engine.add_task("a")
    return create_app(Settings(demo_tasks=False), engine)


def test_stream_disconnect_midway_aborts_request() -> None:
    engine = FakeEngine()
    app = slow_app(engine)
    body = {"inputs": "a long input for many tokens", "task_id": "a"}
    sent = asyncio.run(call_until(app, "/v1/generate_stream", body, lambda sent: len(body_chunks(sent)) >= 2))
    assert 2 <= len(body_chunks(sent)) < 10
    assert (len(engine.aborted), engine.completed) == (1, [])


def test_stream_disconnect_before_first_token_aborts_request() -> None:
    engine = FakeEngine(hold=True)
    app = slow_app(engine)
    sent = asyncio.run(call_until(app, "/v1/generate_stream", {"inputs": "x"}, lambda sent: bool(engine.started)))
    assert not any(chunk.startswith(b"data:") for chunk in body_chunks(sent))
    assert (len(engine.aborted), engine.completed) == (1, [])


def test_generate_disconnect_while_pending_aborts_request() -> None:
    engine = FakeEngine(hold=True)
    app = slow_app(engine)
    asyncio.run(call_until(app, "/v1/generate", {"inputs": "x", "task_id": "a"}, lambda sent: bool(engine.started)))
    assert (len(engine.aborted), engine.completed) == (1, [])


def test_generate_disconnect_counted_as_cancelled() -> None:
    engine = FakeEngine(hold=True)
    app = slow_app(engine)
    asyncio.run(call_until(app, "/v1/generate", {"inputs": "x"}, lambda sent: bool(engine.started)))
    metrics = app.state.promptserve.metrics
    assert metrics.requests.labels(endpoint="generate", outcome="cancelled")._value.get() == 1


def test_generate_client_staying_gets_answer() -> None:
    engine = FakeEngine()
    app = slow_app(engine)
    sent = asyncio.run(call_until(app, "/v1/generate", {"inputs": "x"}, lambda sent: False))
    assert sent[0]["status"] == 200
    assert (len(engine.completed), engine.aborted) == (1, [])
