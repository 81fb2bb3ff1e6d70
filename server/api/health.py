"""Health that means serving: /health fails when the engine stalls with work (a hung forward pass), and
/health/generate runs one request through the engine (Ray's check_health runs the same)."""

from __future__ import annotations

import asyncio
import time

from server.api.errors import ApiError, not_ready
from server.api.state import AppState
from server.engine.errors import QueueFull
from server.engine.interface import EngineClient
from server.engine.types import ClassifyInput, GenerateInput, SamplingParams

PROBE_TEXT = "ping"
GENERATE_ROUTE = "/v1/generate"


def check_live(state: AppState) -> None:
    """503 unless the engine is up and has not stalled with work."""
    problem = state.health_problem()
    if problem is not None:
        raise not_ready(problem)


async def check_serving(state: AppState) -> str:
    """One request through the engine: a token generated (or an input classified, on an encoder with its own
    head); 503 if it fails, or does not finish in time while the engine completes no other step. Says what ran."""
    check_live(state)
    engine, timeout_s = state.engine, state.settings.health_generate_timeout_s
    assert engine is not None  # check_live saw it ready
    steps_before = engine.stats().num_steps
    try:
        async with asyncio.timeout(timeout_s):  # not wait_for: on 3.11 it can lose a cancellation
            return await run_probe(engine)
    except QueueFull:
        return "the engine is busy: its queue is full"
    except TimeoutError:
        if engine.stats().num_steps > steps_before:
            return "the engine is busy: the probe waited, other requests' steps completed"
        raise ApiError(
            503, "unavailable", f"expected the probe request within {timeout_s:g} s (HEALTH_GENERATE_TIMEOUT_S); "
            "found no step completed meanwhile",
        ) from None  # fmt: skip
    except Exception as error:
        raise ApiError(503, "unavailable", f"expected the probe request to succeed; found {error}") from error


async def run_probe(engine: EngineClient) -> str:
    info = engine.info()
    started = time.perf_counter()
    if GENERATE_ROUTE in info.endpoints:
        request = GenerateInput(inputs=PROBE_TEXT, sampling=SamplingParams(max_new_tokens=1))
        async for _ in engine.generate(request):
            pass
        return f"generated one token in {time.perf_counter() - started:.3f} s"
    if info.has_own_head:
        await engine.classify(ClassifyInput(inputs=(PROBE_TEXT,)))
        return f"classified one input in {time.perf_counter() - started:.3f} s"
    return "the engine's loop only: this backbone neither generates nor has a classification head of its own"
