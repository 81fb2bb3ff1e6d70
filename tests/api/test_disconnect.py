"""A client that leaves aborts its request in the engine: driven at the ASGI level to control the disconnect."""

from __future__ import annotations

import asyncio
import contextlib
import json

from fastapi import FastAPI

from server.api.app import create_app
from server.api.settings import Settings
from tests.api.fake_engine import FakeEngine
from tests.api.helpers import body_chunks, call_until


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
    assert metrics.requests.labels(endpoint="generate", task="_backbone", outcome="cancelled")._value.get() == 1


def test_generate_client_staying_gets_answer() -> None:
    engine = FakeEngine()
    app = slow_app(engine)
    sent = asyncio.run(call_until(app, "/v1/generate", {"inputs": "x"}, lambda sent: False))
    assert sent[0]["status"] == 200
    assert (len(engine.completed), engine.aborted) == (1, [])


def test_openai_stream_disconnect_midway_aborts_every_choice() -> None:
    engine = FakeEngine()
    app = slow_app(engine)
    body = {"model": "a", "prompt": "a long input for many tokens", "n": 3, "stream": True, "temperature": 0}
    sent = asyncio.run(call_until(app, "/v1/completions", body, lambda sent: len(body_chunks(sent)) >= 5))
    assert sent[0]["status"] == 200
    assert (len(engine.aborted), engine.completed) == (3, [])


def test_openai_completion_disconnect_while_pending_aborts_every_choice() -> None:
    engine = FakeEngine(hold=True)
    app = slow_app(engine)
    body = {"model": "a", "prompt": ["x", "y"], "n": 2}
    asyncio.run(call_until(app, "/v1/completions", body, lambda sent: len(engine.started) == 4))
    assert (len(engine.aborted), engine.completed) == (4, [])
    metrics = app.state.promptserve.metrics
    cancelled = metrics.registry.get_sample_value(
        "promptserve_requests_total", {"endpoint": "completions", "task": "_other", "outcome": "cancelled"}
    )  # "_other": a request that never produced output does not take a task label of its own
    assert cancelled == 4


async def call_with_send_failing_at_first_body(app: FastAPI, path: str, body: dict) -> None:
    """ASGI 2.4: a server whose client is gone raises OSError from `send` (here at the first body chunk)."""
    pending = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict:
        if pending:
            return pending.pop()
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            raise OSError("the client is gone")

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")], "client": ("127.0.0.1", 5000),
        "server": ("test", 80), "state": {},
    }  # fmt: skip
    with contextlib.suppress(Exception):
        await app(scope, receive, send)


def test_openai_chat_stream_closed_at_its_first_chunk_aborts_and_counts_every_choice() -> None:
    """The role chunks go out before any delta is asked for: a client gone there still aborts and is counted."""
    engine = FakeEngine(has_chat_template=True)
    app = slow_app(engine)
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "n": 2, "stream": True}
    asyncio.run(call_with_send_failing_at_first_body(app, "/v1/chat/completions", body))
    assert (len(engine.aborted), engine.completed) == (2, [])
    metrics = app.state.promptserve.metrics
    cancelled = metrics.registry.get_sample_value(
        "promptserve_requests_total", {"endpoint": "chat_completions", "task": "a", "outcome": "cancelled"}
    )
    assert cancelled == 2
