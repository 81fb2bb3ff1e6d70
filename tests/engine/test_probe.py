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
from server.engine.types import GenerateInput, SamplingParams, StepStats
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


SAME_ANSWER = "the same answer, to the same log-probability, for different inputs"


@pytest.mark.parametrize(
    ("kind", "value", "found"),
    [("prefix", 3e38, "NaN or infinity in its logits"), ("prefix", 1e20, SAME_ANSWER)],
)
def test_a_task_that_overflows_the_backbone_is_refused_and_not_stored(
    engine: AsyncEngine, tiny_llama: TinyBackbone, kind: str, value: float, found: str
):
    with pytest.raises(InvalidTask, match=f"found {found} when task 'overflowing' ran on probe inputs"):
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
    steps: list[StepStats] = []
    engine.add_step_listener(steps.append)
    params = SamplingParams(max_new_tokens=60)

    async def mate_registering_midway() -> tuple[str, tuple[object, bool]]:
        stream = engine.generate(GenerateInput("a batch mate", sampling=params))
        first = await anext(stream)
        registered = await asyncio.to_thread(
            engine.register_task, "good", *upload_filled_with(tiny_llama, "prefix", 0.5)
        )
        rest = [output async for output in stream]
        return (first.token.text + "".join(o.token.text for o in rest if o.token) if rest else ""), registered

    _, (record, created) = asyncio.run(mate_registering_midway())
    assert created and record.task_id == "good"
    assert any(step.batch_size >= 2 and step.num_distinct_tasks == 1 for step in steps)  # probe rows beside the mate
    alone = asyncio.run(collect(engine, GenerateInput("a batch mate", sampling=params)))
    mixed = asyncio.run(collect(engine, GenerateInput("a batch mate", sampling=params)))
    assert alone[-1].completion.generated_text == mixed[-1].completion.generated_text
    assert wait_idle(engine)


def test_a_task_whose_virtual_tokens_leave_no_room_for_an_input_is_refused(
    tiny_gpt2: TinyBackbone, tmp_path_factory: pytest.TempPathFactory
):
    store = tmp_path_factory.mktemp("positions")
    config = EngineConfig(model=str(tiny_gpt2.path), store_dir=str(store), poll_interval_s=0, max_virtual_tokens=1024)
    engine = build_engine(config)
    try:
        adapter, tensor = adapter_parts(tiny_gpt2.adapters["prompt_tuning"])
        adapter["num_virtual_tokens"] = 510  # the tiny GPT-2 has 512 positions
        with pytest.raises(InvalidTask, match="leave room for an input in the backbone's 512 positions"):
            engine.register_task("long", config_bytes(adapter), model_bytes(tensor[:1].repeat(510, 1)))
    finally:
        engine.shutdown()
