"""Helpers shared by the API tests: a raw ASGI call whose client leaves on cue, SSE and Prometheus parsers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

Message = dict
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
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


def events_of(text: str) -> list[dict]:
    """Every event is exactly `data: {json}` followed by a blank line."""
    assert text.endswith("\n\n")
    blocks = text[:-2].split("\n\n")
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks)
    return [json.loads(block.removeprefix("data: ")) for block in blocks]


CONSTANT_LABELS = ("model_name", "replica")  # on every series (test_metrics checks them): left out here


def metric_samples(text: str, constant: bool = False) -> Samples:
    """Prometheus text as {(sample name, its labels sorted): value}; the labels every series carries only when
    `constant`."""
    families = text_string_to_metric_families(text)
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if constant or k not in CONSTANT_LABELS))): s.value
        for family in families
        for s in family.samples
    }
