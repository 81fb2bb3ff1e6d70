"""Slow clients cannot hold connections: a request's headers must arrive within `header_timeout_s`, and a body's
parts each within `body_timeout_s` of the one before; everyone else is served meanwhile."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from server.api.app import create_app
from server.api.settings import Settings
from tests.api.fake_engine import FakeEngine
from tests.live_server import serving

TIMEOUT_S = 0.5
EARLY_S = 0.05  # asyncio runs a timer up to its clock's resolution early


@pytest.fixture
def url() -> Iterator[str]:
    settings = Settings(demo_tasks=False, header_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S)
    with serving(create_app(settings, FakeEngine()), settings) as (base, _):
        yield base


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def served_meanwhile(url: str) -> None:
    response = httpx.post(f"{url}/v1/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 3}})
    assert response.status_code == 200, response.text


def test_a_body_that_stops_arriving_is_answered_408_and_closed_while_others_are_served(url: str):
    started = time.monotonic()
    sock = connect(url)
    sock.sendall(
        b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        b'{"inputs": "'  # and nothing more
    )
    served_meanwhile(url)
    answer = read_all(sock)
    assert TIMEOUT_S - EARLY_S <= time.monotonic() - started < TIMEOUT_S + 2
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
    error = json.loads(body)
    assert error["error_type"] == "timeout" and "request body within 0.5 s" in error["error"]


def test_headers_that_stop_arriving_close_the_connection_while_others_are_served(url: str):
    started = time.monotonic()
    sock = connect(url)
    sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Ty")  # and nothing more
    served_meanwhile(url)
    answer = read_all(sock)
    assert TIMEOUT_S - EARLY_S <= time.monotonic() - started < TIMEOUT_S + 2
    assert answer.startswith(b"HTTP/1.1 408") and b'"error_type": "timeout"' in answer


def test_a_kept_alive_connection_idle_longer_than_the_header_timeout_serves_its_next_request(url: str):
    """Between requests uvicorn's keep-alive timeout (5 s) applies, not the header timeout."""
    sock = connect(url)
    for _ in range(2):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(TIMEOUT_S * 2)


def test_a_connection_that_sends_nothing_is_closed(url: str):
    started = time.monotonic()
    sock = connect(url)
    assert read_all(sock) == b"" and time.monotonic() - started < TIMEOUT_S + 2


def test_a_body_sent_slowly_but_steadily_is_read(url: str):
    body = json.dumps({"inputs": "hello", "parameters": {"max_new_tokens": 2}}).encode()
    sock = connect(url)
    sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body))  # fmt: skip
    for i in range(0, len(body), len(body) // 3 + 1):
        time.sleep(TIMEOUT_S / 3)  # 1 s in all: more than the timeout, but never that long between parts
        sock.sendall(body[i : i + len(body) // 3 + 1])
    assert read_all(sock).startswith(b"HTTP/1.1 200")
