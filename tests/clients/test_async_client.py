"""`AsyncClient` has the same methods as `Client`; the main paths against the app."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptserve_client import AsyncClient, NotFoundError, OverloadedError
from tests.api.fake_engine import FakeEngine, answer_of

pytestmark = pytest.mark.anyio


async def test_async_health_ok(async_client: AsyncClient) -> None:
    assert (await async_client.health()).status == "ok"


async def test_async_info_typed(async_client: AsyncClient) -> None:
    assert (await async_client.info()).model_type == "llama"


async def test_async_task_lifecycle(async_client: AsyncClient, adapter_dir: Path) -> None:
    record = await async_client.register_task("c", adapter_dir)
    assert (await async_client.get_task("c")) == record
    assert "c" in [r.task_id for r in await async_client.list_tasks()]
    await async_client.delete_task("c")
    with pytest.raises(NotFoundError):
        await async_client.get_task("c")


async def test_async_generate_returns_text(async_client: AsyncClient) -> None:
    response = await async_client.generate("hey", task_id="b")
    assert response.generated_text == answer_of("b", "hey")


async def test_async_generate_stream_typed_events(async_client: AsyncClient) -> None:
    events = [event async for event in async_client.generate_stream("hi", task_id="a", max_new_tokens=2)]
    assert [event.token.text for event in events if event.token] == ["a", ":"]
    assert events[-1].generated_text == "a:"


async def test_async_generate_stream_error_raises_typed(async_client: AsyncClient) -> None:
    with pytest.raises(NotFoundError):
        _ = [event async for event in async_client.generate_stream("hi", task_id="nope")]


async def test_async_overloaded_error_has_retry_after(async_client: AsyncClient, engine: FakeEngine) -> None:
    engine.queue_full = True
    with pytest.raises(OverloadedError) as error:
        await async_client.generate("hi")
    assert error.value.retry_after == 3.0
