"""The HTTP server around the app: uvicorn, with a bound on how long a client may take to send its request headers,
and a shutdown (SIGTERM, SIGINT) that lets running requests finish for a grace period, then answers the rest 503.

The body's own bound is the app's (limits.BodyTimeoutMiddleware): it is read by the handler, not here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

from server.api.settings import Settings
from server.api.state import AppState

logger = logging.getLogger(__name__)

HEADER_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n"
    b"\r\n%s"
)
BACKSTOP_S = 5.0  # past the grace, uvicorn itself cancels what is still open (nothing should be)


def header_timeout_protocol(base: type[Any], timeout_s: float) -> type[Any]:
    """`base` (uvicorn's HTTP protocol) closing a connection whose request headers do not all arrive within
    `timeout_s`: of its opening, or of the first byte of a later request on it (between requests, uvicorn's
    keep-alive timeout applies)."""

    class HeaderTimeoutProtocol(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self.header_timer: asyncio.TimerHandle | None = None
            self.awaited_after = self.cycle  # a cycle other than this one: the awaited headers are complete
            self.has_partial_request = False
            self.arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self.header_timer is None and self.cycle is self.awaited_after:  # a later request begins
                self.arm_header_timer()
            self.has_partial_request = True
            super().data_received(data)
            if self.cycle is not self.awaited_after:  # its headers arrived
                self.disarm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.awaited_after, self.has_partial_request = self.cycle, False

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm_header_timer()
            super().connection_lost(exc)

        def arm_header_timer(self) -> None:
            self.header_timer = asyncio.get_running_loop().call_later(timeout_s, self.on_header_timeout)

        def disarm_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def on_header_timeout(self) -> None:
            self.header_timer = None
            if self.transport.is_closing() or self.cycle is not self.awaited_after:
                return
            if self.has_partial_request:
                logger.info("closing a connection whose request headers did not arrive within %g s", timeout_s)
                body = b'{"error": "expected the request headers within %g s; found them incomplete", ' % timeout_s
                body += b'"error_type": "timeout"}'
                self.transport.write(HEADER_TIMEOUT_RESPONSE % (len(body), body))
            self.transport.close()

    return HeaderTimeoutProtocol


def http_protocol(timeout_s: float) -> type[Any]:
    """uvicorn's own choice (httptools where installed, else h11), with the header timeout."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return header_timeout_protocol(AutoHTTPProtocol, timeout_s)


class DrainingServer(uvicorn.Server):
    """On shutdown, running requests have `grace_s` to finish; then the engine stops and answers the rest with
    EngineUnavailable (503; a stream's last event carries the error), so no client holds the shutdown open."""

    def __init__(self, config: uvicorn.Config, state: AppState, grace_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        cutoff = asyncio.create_task(self.stop_engine_after_grace())
        try:
            await super().shutdown(sockets)
        finally:
            cutoff.cancel()

    async def stop_engine_after_grace(self) -> None:
        await asyncio.sleep(self.grace_s)
        engine = self.state.engine
        if engine is not None:
            logger.warning("requests still running %g s into the shutdown: answering them 503", self.grace_s)
            await asyncio.to_thread(engine.shutdown)


def build_server(app: FastAPI, settings: Settings, **config: Any) -> DrainingServer:
    """The server `promptserve serve` runs (and the tests' live servers); `config`: uvicorn.Config overrides."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "workers": 1,
        "log_level": settings.log_level,
        "http": http_protocol(settings.header_timeout_s),
        "timeout_graceful_shutdown": settings.shutdown_grace_s + BACKSTOP_S,
    }
    state: AppState = app.state.promptserve
    return DrainingServer(uvicorn.Config(app, **{**options, **config}), state, settings.shutdown_grace_s)
