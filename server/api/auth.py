"""Who may call: API keys on every route but the health checks and /metrics (as vLLM's --api-key), and the admin
token on task writes. Both are `Authorization: Bearer <secret>`, compared in constant time; the admin token also
passes the API-key check, so a write carries one header."""

from __future__ import annotations

import hmac
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import error_response, unauthorized
from server.api.settings import Settings

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/health/generate", "/metrics"})  # probes and scrapers carry no key


def bearer_token(authorization: str) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header value; None for anything else."""
    scheme, _, given = authorization.partition(" ")
    return given.strip().encode() if scheme.lower() == "bearer" and given.strip() else None


def is_one_of(token: bytes, secrets: tuple[bytes, ...]) -> bool:
    return any([hmac.compare_digest(token, secret) for secret in secrets])  # every one compared: no early exit


class ApiKeyMiddleware:
    """401 (in the route's error shape) for a request without one of the keys; the open paths pass."""

    def __init__(self, app: ASGIApp, secrets: tuple[bytes, ...]) -> None:
        self.app = app
        self.secrets = secrets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.secrets or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        token = bearer_token(headers.get(b"authorization", b"").decode("latin-1"))
        if token is None:
            error = unauthorized("expected the header 'Authorization: Bearer <API key>'; found no bearer token")
        elif not is_one_of(token, self.secrets):
            error = unauthorized("expected one of the server's API keys; found a different bearer token")
        else:
            await self.app(scope, receive, send)
            return
        error.code = "invalid_api_key"  # OpenAI's code for it
        await error_response(error, scope["path"])(scope, receive, send)


def warn_if_open(settings: Settings) -> None:
    """At start: say what is open to anyone who can reach the port."""
    if settings.admin_token is not None:
        return
    if settings.api_keys:
        logger.warning("task writes (PUT, DELETE /v1/tasks) are open to every API key: set ADMIN_TOKEN to limit them")
    else:
        logger.warning(
            "no API key and no admin token: every route, task writes included, is open to anyone who reaches %s:%d "
            "(set API_KEY and ADMIN_TOKEN)", settings.host, settings.port,
        )  # fmt: skip
