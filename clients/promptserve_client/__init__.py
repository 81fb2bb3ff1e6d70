"""A Python client (sync and async) and CLI for a promptserve server; it needs only httpx, httpx-sse and pydantic."""

from promptserve_client.client import AsyncClient, Client
from promptserve_client.errors import (
    ConflictError,
    InternalError,
    NotFoundError,
    OverloadedError,
    PromptserveError,
    TooLargeError,
    UnauthorizedError,
    UnavailableError,
    ValidationError,
)
from promptserve_client.models import (
    Details,
    GenerateResponse,
    Health,
    Info,
    Member,
    StreamEvent,
    TaskRecord,
    Token,
)

__all__ = [
    "AsyncClient",
    "Client",
    "ConflictError",
    "Details",
    "GenerateResponse",
    "Health",
    "Info",
    "InternalError",
    "Member",
    "NotFoundError",
    "OverloadedError",
    "PromptserveError",
    "StreamEvent",
    "TaskRecord",
    "Token",
    "TooLargeError",
    "UnauthorizedError",
    "UnavailableError",
    "ValidationError",
]
