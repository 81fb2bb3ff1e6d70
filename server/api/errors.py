"""The ONE place where engine, store and request errors become HTTP responses: `{"error", "error_type"}`, or on the
OpenAI-compatible routes OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi import HTTPException as FastApiHTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prompt_store.errors import LookupThrottled, StoreUnavailable
from server.engine.errors import (
    EngineUnavailable,
    GenerationFailed,
    InputTooLong,
    InvalidPrompt,
    InvalidTask,
    QueueFull,
    TaskNotFound,
    TaskTooLarge,
    UnknownToken,
    WrongKind,
)

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left
INTERNAL_MESSAGE = "internal server error; the server log has the details"
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
ERROR_TYPE_BY_STATUS = {
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    409: "conflict",
    413: "too_large",
    429: "overloaded",
    503: "unavailable",
}


@dataclass
class ApiError(Exception):
    """An error the HTTP layer raises itself; every mapped exception becomes one of these."""

    status: int
    error_type: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    param: str | None = None  # the request field at fault, when one is (OpenAI's `param`)
    code: str | None = None  # a finer reason than error_type (OpenAI's `code`, e.g. model_not_found)

    def __str__(self) -> str:
        return self.message


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready; nobody reads the response."""


class BodyTooLarge(HTTPException):
    """Raised from `receive` while a body streams in past its limit (an HTTPException so FastAPI re-raises it)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"expected a request body of at most {limit} bytes; found more")


class BodyTimeout(HTTPException):
    """Raised from `receive` when a body stops arriving mid-way; the connection closes with the answer."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            408,
            f"expected the rest of the request body within {timeout_s:g} s of its last part; found nothing more",
            headers={"Connection": "close"},
        )


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


def not_ready(message: str = "the model is still loading; retry shortly") -> ApiError:
    return ApiError(503, "unavailable", message, {"Retry-After": "5"})


def classify(exc: BaseException) -> ApiError | None:
    """The status and error_type of a known exception; None for anything unexpected."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, TaskTooLarge | InputTooLong):  # TaskTooLarge is an InvalidTask: test it first
        return ApiError(413, "too_large", str(exc))
    if isinstance(exc, WrongKind | UnknownToken):
        return ApiError(400, "validation", str(exc), param=leading_field(str(exc)))
    if isinstance(exc, InvalidTask | InvalidPrompt):
        return ApiError(422, "validation", str(exc), param=leading_field(str(exc)))
    if isinstance(exc, TaskNotFound):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, QueueFull):
        return ApiError(429, "overloaded", str(exc), {"Retry-After": str(max(1, math.ceil(exc.retry_after)))})
    if isinstance(exc, LookupThrottled):  # an unknown id under a flood of them: the id may exist, ask again
        return ApiError(503, "unavailable", str(exc), {"Retry-After": "1"})
    if isinstance(exc, EngineUnavailable | StoreUnavailable):  # stopping or failed, or the shared store unreachable:
        return not_ready(str(exc))  # another replica, or this one a moment later, may answer
    if isinstance(exc, GenerationFailed):
        return ApiError(500, "internal", str(exc))
    if isinstance(exc, HTTPException):
        return from_http_exception(exc)
    if isinstance(exc, ClientDisconnected):
        return ApiError(CLIENT_CLOSED_REQUEST, "cancelled", "the client closed the connection")
    return None


def to_api_error(exc: BaseException) -> ApiError:
    """Map one exception to HTTP; anything unknown is logged and becomes a 500 with a generic message."""
    error = classify(exc)
    if error is None:
        logger.error("unhandled error", exc_info=exc)
        return ApiError(500, "internal", INTERNAL_MESSAGE)
    return error


def error_type_of(exc: BaseException) -> str:
    """The error_type an exception maps to, without logging (metrics label outcomes with it)."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    error = classify(exc)
    return "internal" if error is None else error.error_type


def from_http_exception(exc: HTTPException) -> ApiError:
    error_type = ERROR_TYPE_BY_STATUS.get(exc.status_code, "internal" if exc.status_code >= 500 else "validation")
    return ApiError(exc.status_code, error_type, str(exc.detail), dict(exc.headers or {}))


def error_body(error: ApiError) -> dict[str, str]:
    return {"error": error.message, "error_type": error.error_type}


def error_response(error: ApiError, path: str = "") -> JSONResponse:
    """The error in the shape of the route at `path`."""
    if is_openai_path(path):
        return openai_error_response(error)
    return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)


# ---- OpenAI's shape, on the OpenAI-compatible routes

OPENAI_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info")
RETRYABLE_STATUSES = (408, 409, 429, 503)  # what the openai client retries, less 500: ours are not transient
OPENAI_TYPE_BY_STATUS = {401: "authentication_error", 429: "rate_limit_error"}


def is_openai_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in OPENAI_PATHS)


def openai_status(error: ApiError) -> int:
    """OpenAI answers every invalid request with 400, where the native routes say 422."""
    return 400 if error.status == 422 else error.status


def openai_error_body(error: ApiError) -> dict[str, dict[str, str | None]]:
    status = openai_status(error)
    error_type = OPENAI_TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": error.message, "type": error_type, "param": error.param,
                      "code": error.code or error.error_type}}  # fmt: skip


def openai_error_response(error: ApiError) -> JSONResponse:
    """With `x-should-retry: false` where a retry cannot help, so the openai client does not retry in vain."""
    status = openai_status(error)
    headers = dict(error.headers)
    if status not in RETRYABLE_STATUSES:
        headers["x-should-retry"] = "false"
    return JSONResponse(openai_error_body(error), status_code=status, headers=headers)


# ---- request validation: say which field, what was expected, what was found

_FOUND_MAX_CHARS = 80


def describe_validation(errors: Sequence[dict[str, Any]]) -> str:
    return "; ".join(describe_one(error) for error in errors)


def describe_one(error: dict[str, Any]) -> str:
    where = field_name(error.get("loc", ()))
    kind, message, ctx = error.get("type", ""), str(error.get("msg", "")), error.get("ctx") or {}
    if kind == "missing":
        return f"{where}: expected a value; found none (the field is required)"
    if kind == "json_invalid":
        return f"body: expected valid JSON; found a decode error ({ctx.get('error', message)})"
    if kind == "value_error":  # our own validators already say what was expected and found
        return f"{where}: {message.removeprefix('Value error, ')}"
    return f"{where}: expected {expected_text(kind, message, ctx)}; found {found_text(error.get('input'))}"


def expected_text(kind: str, message: str, ctx: dict[str, Any]) -> str:
    if kind == "string_pattern_mismatch":
        return f"a string matching {ctx.get('pattern')}"
    if kind in ("too_short", "string_too_short"):
        unit = "character" if kind == "string_too_short" else "item"
        return f"at least {ctx.get('min_length')} {unit}(s)"
    if kind in ("too_long", "string_too_long"):
        unit = "character" if kind == "string_too_long" else "item"
        return f"at most {ctx.get('max_length')} {unit}(s)"
    expected = message.removeprefix("Input should be ").removeprefix("Value should be ")
    return expected[:1].lower() + expected[1:]


def field_name(loc: Sequence[Any]) -> str:
    parts = [str(part) for part in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "body"


def found_text(value: Any) -> str:
    """The value as JSON, cut short past 80 characters; a cut string or list says how long it is, which the cut hides
    (a stop string past its 1024 characters)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) <= _FOUND_MAX_CHARS:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    size = f" ({len(value)} items)" if isinstance(value, list) else size
    return text[: _FOUND_MAX_CHARS - 3] + "..." + size


def validation_status(errors: Sequence[dict[str, Any]]) -> int:
    """A body that is not JSON at all is a bad request (400); a well-formed but invalid one is 422."""
    return 400 if errors and all(e.get("type") == "json_invalid" for e in errors) else 422


# ---- installation

KNOWN_ERRORS = (ApiError, HTTPException, ClientDisconnected, InvalidTask, TaskNotFound, QueueFull, EngineUnavailable,
                StoreUnavailable,
                InputTooLong, InvalidPrompt, GenerationFailed)  # fmt: skip


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, HTTPException) and type(exc) in (HTTPException, FastApiHTTPException):  # the framework's own
        return error_response(describe_framework_error(request, exc), request.url.path)
    return error_response(to_api_error(exc), request.url.path)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if not_json_body(errors):
        content_type = request.headers.get("content-type")
        found = f"Content-Type {content_type!r}" if content_type else "no Content-Type header"
        message = f"body: expected a JSON object sent with Content-Type application/json; found {found}"
        return error_response(ApiError(422, "validation", message), request.url.path)
    error = ApiError(validation_status(errors), "validation", describe_validation(errors), param=first_field(errors))
    return error_response(error, request.url.path)


def first_field(errors: Sequence[dict[str, Any]]) -> str | None:
    """The top-level field at fault (OpenAI's `param`); for a rule across fields, the one its message names first;
    None when the body as a whole is."""
    loc = list(errors[0].get("loc", ())) if errors else []
    names = [part for part in loc[1:] if isinstance(part, str)] if loc[:1] == ["body"] else []
    if names:
        return names[0]
    return leading_field(str(errors[0].get("msg", "")).removeprefix("Value error, ")) if errors else None


FIELD_PREFIX = re.compile(r"^([a-z_]+)[\w.\[\]]*: ")


def leading_field(message: str) -> str | None:
    """The request field a message opens with ("prompt_embeds: expected ..."), our errors' convention."""
    match = FIELD_PREFIX.match(message)
    return match.group(1) if match and match.group(1) != "body" else None


def not_json_body(errors: Sequence[dict[str, Any]]) -> bool:
    """FastAPI hands a body that is not declared as JSON to the model as raw bytes; say so, not `found b'...'`."""
    return any(tuple(e.get("loc", ())) == ("body",) and isinstance(e.get("input"), bytes) for e in errors)


def describe_framework_error(request: Request, exc: HTTPException) -> ApiError:
    """Starlette's and FastAPI's own errors ("Not Found", "Method Not Allowed", "There was an error parsing the
    body") rewritten to say what was expected and what was found."""
    error = from_http_exception(exc)
    method, path = request.method, request.url.path
    if exc.status_code == 404 and exc.detail == "Not Found":
        error.message = f"expected a route of the promptserve API (see /docs); found {method} {path}"
    elif exc.status_code == 405:
        allowed = allowed_methods(request)
        error.headers = {"Allow": ", ".join(allowed)}
        error.message = f"expected {' or '.join(allowed)} for {path}; found {method}"
    elif exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        error.message = describe_unparsable_body(exc.__cause__)
    return error


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first route it matched)."""
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in request.app.routes)
    ]


def describe_unparsable_body(cause: BaseException | None) -> str:
    if isinstance(cause, UnicodeDecodeError):
        found = f"byte 0x{cause.object[cause.start]:02x} at offset {cause.start}, which is not {cause.encoding}"
        return f"body: expected JSON text encoded as UTF-8; found {found}"
    if isinstance(cause, RecursionError):
        return "body: expected JSON nested less deeply; found nesting deeper than the parser's recursion limit"
    found = "an unreadable body" if cause is None else f"an unreadable body ({type(cause).__name__})"
    return f"body: expected a JSON object; found {found}"


def install_error_handlers(app: FastAPI) -> None:
    for exc_type in KNOWN_ERRORS:
        app.add_exception_handler(exc_type, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_middleware(CatchAllMiddleware)


class CatchAllMiddleware:
    """Anything unexpected becomes a logged 500 `internal` with a generic message (never a stack trace)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            if started:  # a streamed response already has its status line: nothing left to say
                raise
            await error_response(to_api_error(exc), scope["path"])(scope, receive, send)
