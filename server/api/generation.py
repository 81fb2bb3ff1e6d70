"""Turning the engine's output stream into one JSON answer or server-sent events; a client that leaves aborts.

Closing the engine's async iterator is how a request is aborted, so every path here closes it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import anyio
from fastapi import Request

from server.api.errors import ApiError, ClientDisconnected, error_body, error_type_of, to_api_error
from server.api.metrics import RequestTracker
from server.api.schemas import StreamEvent
from server.engine.errors import EngineUnavailable
from server.engine.interface import EngineClient
from server.engine.types import Completion, GenerateInput, RequestOutput

T = TypeVar("T")
Outputs = AsyncIterator[RequestOutput]


# ---- the engine's iterator


def check_members(task_ids: tuple[str | None, ...], max_batch_size: int) -> None:
    """An ensemble's members are rows of one batch: at most the server's batch size (as the schema says)."""
    if len(task_ids) > max_batch_size:
        raise ApiError(422, "validation", f"task_ids: expected at most {max_batch_size} members (the server's batch "
                       f"size); found {len(task_ids)}", param="task_ids")  # fmt: skip


async def close_outputs(outputs: Outputs) -> None:
    """Close the engine's iterator (an abort unless it finished), even while this task is being cancelled."""
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


async def next_output(outputs: Outputs) -> RequestOutput:
    output = await anext(outputs, None)
    if output is None:
        raise EngineUnavailable("the engine ended the request without a result")
    if output.error is not None:
        raise output.error
    return output


def observe(tracker: RequestTracker, output: RequestOutput) -> None:
    if output.token is not None:
        tracker.on_token()
    if output.completion is not None:
        tracker.on_completion(output.completion)


async def complete(engine: EngineClient, request: GenerateInput, tracker: RequestTracker) -> Completion:
    """The final completion of a non-streamed request."""
    outputs = engine.generate(request)
    try:
        while True:
            output = await next_output(outputs)
            observe(tracker, output)
            if output.completion is not None:
                return output.completion
    finally:
        await close_outputs(outputs)


async def start_stream(engine: EngineClient, request: GenerateInput) -> tuple[RequestOutput, Outputs]:
    """Wait for the first output before any byte is sent, so early errors still get their HTTP status."""
    outputs = engine.generate(request)
    try:
        return await next_output(outputs), outputs
    except BaseException:
        await close_outputs(outputs)
        raise


# ---- the client going away


async def wait_for_disconnect(request: Request) -> None:
    """Once the body is read, the next ASGI message is the disconnect (servers hold it until then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work` unless the client leaves first: then cancel it (closing the engine's iterator) and raise."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let its cleanup (the abort) run before answering
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


async def tracked(request: Request, tracker: RequestTracker, work: Awaitable[T]) -> T:
    """`until_disconnected`, recording the outcome of a request that ends here (a disconnect is `cancelled`)."""
    try:
        return await until_disconnected(request, work)
    except BaseException as exc:
        tracker.finish(error_type_of(exc))
        raise


# ---- server-sent events


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def events_of(output: RequestOutput, with_tokens: bool, nothing_streamed: bool) -> list[StreamEvent]:
    completion = output.completion
    if completion is None:
        return [] if output.token is None else [StreamEvent.of_token(output.token)]
    if output.token is not None:
        return [StreamEvent.final(output.token, completion, with_tokens)]
    if nothing_streamed and completion.tokens:  # a vote ensemble: its answer's tokens are known only now
        *head, last = completion.tokens
        return [*map(StreamEvent.of_token, head), StreamEvent.final(last, completion, with_tokens)]
    return [StreamEvent.final(None, completion, with_tokens)]


async def stream_events(
    first: RequestOutput, outputs: Outputs, with_tokens: bool, tracker: RequestTracker
) -> AsyncIterator[str]:
    """One event per token; the last carries generated_text and details. A late error becomes an error event."""
    outcome, output, nothing_streamed = "cancelled", first, True
    try:
        while True:
            observe(tracker, output)
            for event in events_of(output, with_tokens, nothing_streamed):
                yield sse(event.model_dump_json())
                nothing_streamed = False
            if output.completion is not None:
                outcome = "success"
                return
            output = await next_output(outputs)
    except Exception as exc:  # the status line is already sent: report it in-band, as TGI does
        outcome = error_type_of(exc)
        yield sse(json.dumps(error_body(to_api_error(exc))))
    finally:
        await close_outputs(outputs)
        tracker.finish(outcome)
