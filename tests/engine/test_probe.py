"""A new task runs once on the engine before it is stored: one whose logits cannot stay finite is refused (422)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from prompt_store.errors import InvalidTask
from server.engine.async_engine import AsyncEngine, build_engine
from server.engine.config import EngineConfig
from server.engine.types import GenerateInput, SamplingParams
from tests.engine.test_async_engine import collect, wait_idle
from tests.fixtures import TinyBackbone
from tests.prompt_store.helpers import adapter_parts, config_bytes, model_bytes


@pytest.fixture(scope="module")
def engine(tiny_llama: TinyBackbone, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsyncEngine]:
    store = tmp_path_factory.mktemp("probe-store")
    engine = build_engine(EngineConfig(model=str(tiny_llama.path), store_dir=str(store), poll_interval_s=0))
    yield engine
    engine.shutdown()


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def upload_filled_with(tiny: TinyBackbone, kind: str, value: float) -> tuple[bytes, bytes]:
    config, tensor = adapter_parts(tiny.adapters[kind])
    return config_bytes(config), model_bytes(torch.full_like(tensor, value))


@pytest.mark.parametrize(
    ("kind", "value", "found"),
    [("prefix", 3e38, "NaN or infinity"), ("prefix", 1e20, r"every logit equal \(nothing of the input left\)")],
)
def test_a_task_that_overflows_the_backbone_is_refused_and_not_stored(
    engine: AsyncEngine, tiny_llama: TinyBackbone, kind: str, value: float, found: str
):
    with pytest.raises(InvalidTask, match=f"found {found} when task 'overflowing' ran on a probe input"):
        engine.register_task("overflowing", *upload_filled_with(tiny_llama, kind, value))
    assert "overflowing" not in {record.task_id for record in engine.list_tasks()}
    assert wait_idle(engine) and wait_for(lambda: not engine.engine.memory.tasks)  # the probe left nothing behind


def test_a_prompt_whose_vectors_normalise_away_is_kept_it_answers_like_an_empty_prompt(
    engine: AsyncEngine, tiny_llama: TinyBackbone
):
    """3e38 everywhere: each layer's normalisation divides the overflow away, so the virtual tokens' keys and values
    are zeros; finite, varied logits (as PEFT's own model gives): the task answers, so it is stored."""
    record, _ = engine.register_task("faint", *upload_filled_with(tiny_llama, "prompt_tuning", 3e38))
    params = SamplingParams(max_new_tokens=4)
    outputs = asyncio.run(collect(engine, GenerateInput("hello", ("faint",), sampling=params)))
    assert record.version == 1 and outputs[-1].completion.generated_tokens == 4


def test_a_good_task_passes_its_probe_while_batch_mates_run(engine: AsyncEngine, tiny_llama: TinyBackbone):
    async def scenario() -> tuple[str, int]:
        params = SamplingParams(max_new_tokens=30)
        running = [output async for output in engine.generate(GenerateInput("a batch mate", sampling=params))]
        return running[-1].completion.generated_text, running[-1].completion.generated_tokens

    async def both() -> tuple[tuple[str, int], tuple[object, bool]]:
        registering = asyncio.to_thread(engine.register_task, "good", *upload_filled_with(tiny_llama, "prefix", 0.5))
        return await asyncio.gather(scenario(), registering)

    (text, num_tokens), (record, created) = asyncio.run(both())
    assert created and record.task_id == "good" and num_tokens <= 30
    assert asyncio.run(scenario())[0] == text  # the mate's answer did not depend on the probe beside it
    assert wait_idle(engine)
