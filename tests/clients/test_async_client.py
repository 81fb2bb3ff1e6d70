"""`AsyncClient` has the same methods as `Client`; the main paths against the app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from promptserve_client import AsyncClient, LabelScore, NotFoundError, OverloadedError, TokenLabel, ValidationError
from tests.api.fake_engine import FakeEngine, answer_of
from tests.clients.canned_server import TASK_RECORD, CannedServer

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


async def test_async_classify_posts_body_and_parses_both_shapes(
    canned_async_client: AsyncClient, canned: CannedServer
) -> None:
    token = {"token": "Ada", "start": 0, "end": 3, "label": "B-PER", "score": 0.9}
    canned.answer({"predictions": [[{"label": "pos", "score": 0.8}], [token]]})
    response = await canned_async_client.classify(["a", "b"], "t", top_k=1)
    assert canned.last_body == {"inputs": ["a", "b"], "task_id": "t", "parameters": {"top_k": 1}}
    assert response.predictions == [[LabelScore(label="pos", score=0.8)], [TokenLabel.model_validate(token)]]


async def test_async_classify_validation_error(canned_async_client: AsyncClient, canned: CannedServer) -> None:
    canned.answer({"error": "top_k: expected at least 1; found 0", "error_type": "validation"}, status=422)
    with pytest.raises(ValidationError, match="found 0"):
        await canned_async_client.classify("a", "t", top_k=0)


async def test_async_score_posts_body_and_parses(canned_async_client: AsyncClient, canned: CannedServer) -> None:
    score = {"candidate": "yes", "logprob": -1.0, "mean_logprob": -1.0, "num_tokens": 1}
    canned.answer({"scores": [score], "best": "yes"})
    response = await canned_async_client.score("q", ["yes"], task_ids=["a", "b"])
    assert canned.last_body == {"inputs": "q", "candidates": ["yes"], "task_id": None, "task_ids": ["a", "b"]}
    assert (response.best, response.scores[0].num_tokens) == ("yes", 1)


async def test_async_register_task_sends_labels(
    canned_async_client: AsyncClient, canned: CannedServer, adapter_dir: Path
) -> None:
    canned.answer(TASK_RECORD, status=201)
    await canned_async_client.register_task("sentiment", adapter_dir, labels=["neg", "pos"])
    assert json.loads(canned.last_parts["labels"].content) == ["neg", "pos"]
