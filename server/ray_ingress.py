"""The HTTP side of the Ray application: a light ingress that relays every request to an engine replica through a
DeploymentHandle, so a replica that dies is answered for by a process that is still alive (as Ray Serve LLM's
OpenAI ingress does in front of its LLMServer deployments).

The ingress reads the request (method, path, query, headers, body; the same body limits and API keys as a
replica), and calls the engine deployment's `serve_http` as a stream: the replica runs it through its unchanged
FastAPI app in-process (`call_asgi`) and yields the app's ASGI messages, the status line and headers, then the
body's chunks, as many at a time as are ready (a JSON answer is one item of Ray's stream, a token's event one),
which the ingress sends on as they come (server-sent events stream through).

When the engine replica dies (its process killed, out of memory, its node lost) before the status line was sent,
the request is tried once more on another replica (a task write is not: it may have happened), then answered
with this server's JSON error, 503 `unavailable` with `Retry-After`, which the `openai` client retries. After the
status line of a stream, the stream ends with the API's own in-stream error event. `/health` answers 503 when no
engine replica answers within `HEALTH_WAIT_S` (none up: Ray would hold the request until one is).

Each call names the request's task as Ray's multiplexed model id, which the engine deployment's request router
(server/task_router.py) routes by: Ray's `serve_multiplexed_model_id` header if the client set it, else the JSON
body's `task_id` (native routes) or `model` (OpenAI routes: a task id or `<backbone>:<task>`), so OpenAI clients get
a replica holding their task without setting any header.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prompt_store.adapter import is_valid_task_id
from server.api.errors import ApiError, error_body, error_response, is_openai_path, openai_error_body, to_api_error
from server.api.generation import sse
from server.api.openai_generation import DONE

logger = logging.getLogger(__name__)

# what a call to a replica raises when its process is gone, or Ray cannot reach or place it
REPLICA_GONE = (ActorDiedError, RayActorError, ActorUnavailableError, ReplicaUnavailableError,
                DeploymentUnavailableError)  # fmt: skip
MULTIPLEXED_HEADER = "serve_multiplexed_model_id"  # Ray's: the task id the engine's request router routes by
# how long /health waits for an engine replica's answer before answering 503 (not /health/generate: it runs a
# token through the engine, which on a busy replica may take longer)
HEALTH_WAIT_S = 5.0
RETRY_AFTER_S = 1
FORWARDED_SCOPE = ("type", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
                   "headers", "client", "server")  # fmt: skip


class NoReplicaAnswered(Exception):
    """No engine replica took a /health request within the ingress's wait."""


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress received it: its ASGI scope's plain fields and its whole body."""

    scope: dict[str, Any]
    body: bytes

    @classmethod
    def of(cls, scope: Scope, body: bytes) -> ForwardedRequest:
        fields = {name: scope[name] for name in FORWARDED_SCOPE if name in scope}
        fields["headers"] = [(bytes(name), bytes(value)) for name, value in scope["headers"]]
        return cls(fields, body)

    @property
    def path(self) -> str:
        return str(self.scope["path"])

    @property
    def retryable(self) -> bool:
        """Safe to run twice: anything but a write to the task store (a registration may have happened)."""
        return self.scope["method"] in ("GET", "HEAD", "OPTIONS") or not self.path.startswith("/v1/tasks")


async def call_asgi(app: ASGIApp, request: ForwardedRequest) -> AsyncIterator[list[Message]]:
    """The app's answer to `request`, as its ASGI messages (status line, then body chunks), run in this process;
    each item holds the messages sent since the last (each item crosses Ray's stream at a cost).

    The app sees the whole body at once, then a client that stays until the answer's last part is taken (a
    consumer that stops early reads as a client that left: the app aborts its engine requests)."""
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app({**request.scope, "state": {}}, receive, send)
        finally:
            await messages.put(None)

    task = asyncio.create_task(run())
    try:
        finished = False
        while not finished:
            ready = [await messages.get()]
            while not messages.empty():
                ready.append(messages.get_nowait())
            batch: list[Message] = []
            for message in ready:
                finished = message is None or is_last(message)
                if message is not None:
                    batch.append(message)
                if finished:
                    break
            if batch:
                yield batch
        await task  # the app's own failure, if it had one (its middleware answers most as JSON itself)
    finally:
        gone.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def is_last(message: Message) -> bool:
    return message["type"] == "http.response.body" and not message.get("more_body", False)


def replica_lost(attempts: int) -> ApiError:
    return ApiError(
        503,
        "unavailable",
        f"the engine replica serving this request stopped before answering ({attempts} tried); retry",
        {"Retry-After": str(RETRY_AFTER_S)},
        code="replica_unavailable",
    )


def no_replica() -> ApiError:
    return ApiError(
        503,
        "unavailable",
        f"expected an engine replica to answer within {HEALTH_WAIT_S:g} s; found none (none running, or each one "
        "at max_ongoing_requests)",
        {"Retry-After": str(RETRY_AFTER_S)},
        code="replica_unavailable",
    )


def stream_error_event(error: ApiError, path: str) -> bytes:
    """The event a stream ends with when it fails after its status line, in the route's own shape."""
    if is_openai_path(path):
        return (sse(json.dumps(openai_error_body(error))) + DONE).encode()
    return sse(json.dumps(error_body(error))).encode()


def task_of(request: ForwardedRequest) -> str:
    """The task a request is for, as the router keys it: the multiplexed header, else a JSON body's `task_id` or
    `model` (after `<backbone>:`); "" for none (an ensemble, the bare backbone's name is no task any replica holds)."""
    headers = Headers(raw=request.scope["headers"])
    if headers.get(MULTIPLEXED_HEADER):
        return headers[MULTIPLEXED_HEADER]
    is_json = headers.get("content-type", "application/json").startswith("application/json")
    if request.scope["method"] != "POST" or not is_json or request.path.startswith("/v1/tasks"):
        return ""
    try:
        fields = json.loads(request.body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return ""  # the replica's app answers what is wrong with it
    named = (fields.get("task_id") or fields.get("model")) if isinstance(fields, dict) else None
    task_id = named.rpartition(":")[2] if isinstance(named, str) else ""
    return task_id if is_valid_task_id(task_id) else ""


def is_stream(start: Message) -> bool:
    content_type = Headers(raw=start.get("headers", [])).get("content-type", "")
    return content_type.startswith("text/event-stream")


Forward = Callable[[ForwardedRequest, str], AsyncIterator[list[Message]]]  # a request and its task id -> messages


class Relay:
    """The ingress's ASGI app: each request relayed to an engine replica by `forward` (a DeploymentHandle call)."""

    def __init__(self, forward: Forward, health_wait_s: float = HEALTH_WAIT_S) -> None:
        self.forward = forward
        self.health_wait_s = health_wait_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        request = ForwardedRequest.of(scope, await read_body(receive))
        task_id = task_of(request)
        attempts = 2 if request.retryable else 1
        for attempt in range(1, attempts + 1):
            start: Message | None = None
            try:
                async for message in self.relay_once(request, task_id):
                    start = message if message["type"] == "http.response.start" else start
                    await send(message)
                return
            except REPLICA_GONE as exc:
                if start is not None:  # the status line is sent: end the body, with an error event if a stream
                    logger.warning("an engine replica died mid-answer to %s: %s", request.path, exc)
                    event = stream_error_event(replica_lost(attempt), request.path) if is_stream(start) else b""
                    await send({"type": "http.response.body", "body": event, "more_body": False})
                    return
                logger.warning("an engine replica died before answering %s (try %d): %s", request.path, attempt, exc)
            except NoReplicaAnswered:
                await error_response(no_replica(), request.path)(scope, receive, send)
                return
            except Exception as exc:  # anything else the call raised: a replica's app answers its own errors
                if start is not None:
                    raise
                await error_response(to_api_error(exc), request.path)(scope, receive, send)  # logged, 500
                return
        await error_response(replica_lost(attempts), request.path)(scope, receive, send)

    async def relay_once(self, request: ForwardedRequest, task_id: str) -> AsyncIterator[Message]:
        """One replica's messages; /health's first within `health_wait_s` (NoReplicaAnswered otherwise)."""
        batches = self.forward(request, task_id)
        try:
            if request.path == "/health":
                try:
                    async with asyncio.timeout(self.health_wait_s):  # not wait_for (3.11 loses cancellations)
                        first = await anext(batches)
                except TimeoutError:
                    raise NoReplicaAnswered from None
                for message in first:
                    yield message
            async for batch in batches:
                for message in batch:
                    yield message
        finally:
            await close(batches)


async def close(messages: AsyncIterator[list[Message]]) -> None:
    """Stop a replica's answer that is no longer read (the client left, or /health gave up on it)."""
    cancel = getattr(messages, "cancel", None)  # a DeploymentResponseGenerator: cancels the replica's side
    if cancel is not None:
        cancel()
    aclose: Callable[[], Awaitable[None]] | None = getattr(messages, "aclose", None)
    if aclose is not None:
        await aclose()


async def read_body(receive: Receive) -> bytes:
    """The whole body (its size and timing already bounded by the limit middleware around the relay)."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
