"""A real server on a real port in this process (uvicorn in a thread): the client, the CLIs and the fuzzer use it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from server.api.app import create_app
from server.api.serving import DrainingServer, build_server
from server.api.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server at {url} did not turn healthy")


@contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    """Serve `settings` on 127.0.0.1 until the block ends; yields the base URL once /health answers 200."""
    with serving(create_app(settings), settings) as (url, _):
        yield url


@contextmanager
def serving(app: FastAPI, settings: Settings, **config: Any) -> Iterator[tuple[str, DrainingServer]]:
    """`app` served as `promptserve serve` serves it (build_server), on a free port, in a thread."""
    port = free_port()
    server = build_server(app, settings, host="127.0.0.1", port=port, log_level="critical", **config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield url, server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
