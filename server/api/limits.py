"""Request-body limits: its size, enforced before a body is read into memory (413 `too_large`), and the time
between its parts (408 `timeout`)."""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import ApiError, BodyTimeout, BodyTooLarge, error_response


class BodyLimitMiddleware:
    """Uploads (PUT) may weigh `upload_limit` bytes, other bodies `request_limit`.

    A declared Content-Length over the limit is refused at once; a chunked body is counted as it streams in.
    """

    def __init__(self, app: ASGIApp, upload_limit: int, request_limit: int) -> None:
        self.app = app
        self.upload_limit = upload_limit
        self.request_limit = request_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if scope["method"] == "PUT" else self.request_limit
        declared = declared_length(scope)
        if declared is not None and declared > limit:
            found = f"expected a request body of at most {limit} bytes; found Content-Length {declared}"
            await error_response(ApiError(413, "too_large", found), scope["path"])(scope, receive, send)
            return
        await self.app(scope, counting(receive, limit), send)


def declared_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def counting(receive: Receive, limit: int) -> Receive:
    received = 0

    async def receive_counted() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
        return message

    return receive_counted


class BodyTimeoutMiddleware:
    """A body must keep arriving: each of its parts within `timeout_s` of the one before (as nginx's
    client_body_timeout), so a client that declares more than it sends cannot hold a connection."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, timed(receive, self.timeout_s), send)


def timed(receive: Receive, timeout_s: float) -> Receive:
    """`receive` bounded until the body's last part; after it (a stream waiting for the client to leave), not."""
    body_done = False

    async def receive_timed() -> Message:
        nonlocal body_done
        if body_done:
            return await receive()
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: on 3.11 it can lose a cancellation
                message = await receive()
        except TimeoutError:
            raise BodyTimeout(timeout_s) from None
        body_done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return receive_timed
