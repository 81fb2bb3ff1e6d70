"""Request-body size limits, enforced before a body is read into memory (413 `too_large`)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import ApiError, BodyTooLarge, error_response


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
