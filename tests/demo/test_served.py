"""The point of the demo, through the real engine: the demo tasks and the bare backbone share batches on the
built-in default backbone, and each row answers as its task says."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.demo import register_demo_tasks
from server.engine.async_engine import AsyncEngine, build_engine
from server.engine.config import EngineConfig
from server.engine.types import Completion, EnsembleMode, GenerateInput, SamplingParams, StepStats
from tests.demo.test_outputs import README_EXAMPLE

pytestmark = pytest.mark.slow


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[AsyncEngine]:
    engine = build_engine(EngineConfig(model=None, store_dir=str(tmp_path / "store"), device="cpu", poll_interval_s=0))
    yield engine
    engine.shutdown()


async def answer(engine: AsyncEngine, task_id: str | None) -> str:
    request = GenerateInput("hello world", task_ids=(task_id,), sampling=SamplingParams(max_new_tokens=32))
    outputs = [output async for output in engine.generate(request)]
    assert outputs[-1].completion is not None
    return outputs[-1].completion.generated_text


async def answer_all(engine: AsyncEngine) -> dict[str | None, str]:
    texts = await asyncio.gather(*(answer(engine, task_id) for task_id in README_EXAMPLE))
    return dict(zip(README_EXAMPLE, texts, strict=True))


def test_demo_tasks_answer_differently_in_one_mixed_batch(engine: AsyncEngine) -> None:
    steps: list[StepStats] = []
    engine.add_step_listener(steps.append)
    assert sorted(register_demo_tasks(engine)) == sorted(k for k in README_EXAMPLE if k)
    assert asyncio.run(answer_all(engine)) == README_EXAMPLE
    assert max(step.num_distinct_tasks for step in steps) >= 3


def test_the_readme_ensemble_votes_for_the_majority(engine: AsyncEngine) -> None:
    register_demo_tasks(engine)
    request = GenerateInput(
        "hello world", ("upper", "reverse", "upper"), EnsembleMode.VOTE, SamplingParams(max_new_tokens=32)
    )
    completion = asyncio.run(collect_last(engine, request))
    assert completion.generated_text == README_EXAMPLE["upper"]
    assert completion.members is not None
    assert [m.generated_text for m in completion.members] == [README_EXAMPLE[t] for t in ("upper", "reverse", "upper")]


async def collect_last(engine: AsyncEngine, request: GenerateInput) -> Completion:
    outputs = [output async for output in engine.generate(request)]
    assert outputs[-1].completion is not None
    return outputs[-1].completion
