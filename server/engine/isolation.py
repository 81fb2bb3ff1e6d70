"""A fault belongs to the request that caused it: what one request owns in a step (its task's loading, its head,
its scoring, its sampling) runs guarded, and a failure fails that request alone (with its ensemble siblings, its
other rows); the rest of the batch goes on as if nothing happened."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import TypeVar

from server.engine.errors import GenerationFailed
from server.engine.request import Request

logger = logging.getLogger(__name__)

T = TypeVar("T")
Fail = Callable[[Request, Exception], None]  # the engine's: the request gets the error, leaves after the step


def guarded(request: Request, what: str, action: Callable[[], T], fail: Fail) -> T | None:
    """`action`'s result; if it raises, `request` fails with what was expected and what was found."""
    try:
        return action()
    except GenerationFailed as error:  # already this request's own, saying what and why (UnservableTarget)
        logger.warning("request %s: %s failed; failing this request only: %s", request.request_id, what, error)
        fail(request, error)
        return None
    except Exception as error:
        logger.exception("request %s: %s failed; failing this request only", request.request_id, what)
        fail(request, GenerationFailed(f"expected {what} to succeed; found {type(error).__name__}: {error}"))
        return None


def isolated(
    count: int, request_of: Callable[[int], Request], action: Callable[[list[int]], T], what: str, fail: Fail
) -> list[tuple[list[int], T]]:
    """`action` over items 0..count-1 at once (the batched path); if that raises, again request by request, so that
    the failure is charged to the request that caused it. Returns the parts that succeeded, each (its items, its
    result). `action` must leave no trace when it raises (the sampler's random draws are made before it)."""
    everything = list(range(count))
    try:
        return [(everything, action(everything))]
    except Exception as error:
        logger.warning("%s failed for the whole batch (%s); retrying request by request", what, error)
    parts = []
    for request, items in group_by_request(everything, request_of):
        result = guarded(request, what, partial(action, items), fail)
        if result is not None:
            parts.append((items, result))
    return parts


def group_by_request(items: list[int], request_of: Callable[[int], Request]) -> list[tuple[Request, list[int]]]:
    groups: dict[int, tuple[Request, list[int]]] = {}
    for i in items:
        request = request_of(i)
        groups.setdefault(id(request), (request, []))[1].append(i)
    return list(groups.values())
