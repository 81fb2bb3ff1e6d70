"""A new task runs once on the engine before it is stored: one whose logits cannot stay finite is refused (422)."""

from __future__ import annotations

import asyncio
import json
import random
import string
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from prompt_store.errors import InvalidTask
from server.cli import main as promptserve
from server.engine.async_engine import AsyncEngine, build_engine
from server.engine.config import EngineConfig
from server.engine.probe import PROBE_TEXTS
from server.engine.types import ClassifyInput, GenerateInput, SamplingParams, StepStats
from tests.engine.test_async_engine import collect, wait_idle
from tests.fixtures import TinyBackbone
from tests.nlu_fixtures import write_nlu_adapter
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


SAME_LOGITS = "the same final logits for different inputs"
AS_ZEROS = "the same final logits as a task of zeros on the same input"


@pytest.mark.parametrize(
    ("kind", "value", "found"),
    [
        ("prefix", 3e38, "NaN or infinity in its logits"),
        ("prefix", 1e20, SAME_LOGITS),
        ("prompt_tuning", 1e30, AS_ZEROS),  # normalised to zero: it answers "" to everything, as zeros do
        ("prompt_tuning", 3e38, AS_ZEROS),
        ("p_tuning_mlp", 1e30, AS_ZEROS),
    ],
)
def test_a_task_that_overflows_the_backbone_is_refused_and_not_stored(
    engine: AsyncEngine, tiny_llama: TinyBackbone, kind: str, value: float, found: str
):
    with pytest.raises(InvalidTask, match=f"found {found}.* when task 'overflowing' ran on probe inputs"):
        engine.register_task("overflowing", *upload_filled_with(tiny_llama, kind, value))
    assert "overflowing" not in {record.task_id for record in engine.list_tasks()}
    assert wait_idle(engine) and wait_for(lambda: not engine.engine.memory.tasks)  # the probe left nothing behind


# ---- tasks that answer, however confidently, are kept


@pytest.fixture(scope="module")
def constant_task(tiny_llama: TinyBackbone, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prefix task trained by `promptserve train` to answer "ok" to anything."""
    root = tmp_path_factory.mktemp("constant")
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + " ,.!?"
    lines = ["".join(rng.choices(alphabet, k=rng.randint(3, 24))) for _ in range(96)]
    (root / "data.jsonl").write_text("".join(json.dumps({"input": line, "output": "ok"}) + "\n" for line in lines))
    argv = ["train", "--model", str(tiny_llama.path), "--data", str(root / "data.jsonl"), "--output",
            str(root / "ok"), "--method", "prefix", "--num-virtual-tokens", "4", "--steps", "300", "--batch-size", "8",
            "--warmup", "5", "--learning-rate", "1e-1", "--threads", "1", "--quiet"]  # fmt: skip
    assert promptserve(argv) == 0
    assert json.loads((root / "ok" / "metrics.json").read_text())["exact_match"] >= 0.8
    return root / "ok"


def test_a_trained_task_that_answers_the_same_to_everything_is_kept(engine: AsyncEngine, constant_task: Path):
    record, _ = engine.register_task("ok", *read_upload(constant_task))
    params = SamplingParams(max_new_tokens=2)
    answers = {asyncio.run(collect(engine, GenerateInput(text, ("ok",), sampling=params)))[-1].completion.generated_text
               for text in PROBE_TEXTS}  # fmt: skip
    assert record.version >= 1 and answers == {"ok"}


def test_a_trained_task_scaled_until_it_swamps_the_input_is_refused(engine: AsyncEngine, constant_task: Path):
    config, model = read_upload(constant_task)
    with pytest.raises(InvalidTask, match=SAME_LOGITS):
        engine.register_task("ok-swamped", config, model_bytes(load(model)["prompt_embeddings"] * 1e20))


def test_a_sharp_classifier_is_kept_though_its_answers_round_to_the_same(
    engine: AsyncEngine, tiny_llama: TinyBackbone, tmp_path: Path
):
    """Heads scaled until the probe inputs get probability 1.000000 (what the probe once took for an overflow), until
    one gives both inputs the same label: every one is kept, as its hidden states still depend on the input."""
    for seed in range(8):
        adapter = write_nlu_adapter(tiny_llama.path, "seq", "prompt_tuning", tmp_path / f"cls{seed}", 4, seed=seed)
        tensors = load((adapter / "adapter_model.safetensors").read_bytes())
        sharp = {name: t * 1000 if name.endswith("score.weight") else t for name, t in tensors.items()}
        (adapter / "adapter_model.safetensors").write_bytes(save(sharp))
        record, _ = engine.register_task(f"sharp{seed}", *read_upload(adapter))
        answers = asyncio.run(engine.classify(ClassifyInput(PROBE_TEXTS, (record.task_id,)))).predictions
        assert {round(prediction[0].score, 6) for prediction in answers} == {1.0}
        if len({prediction[0].label for prediction in answers}) == 1:
            return
    pytest.fail("no seed gave both probe inputs the same label")


def test_a_classifier_whose_prompt_normalises_to_nothing_is_refused(
    engine: AsyncEngine, tiny_llama: TinyBackbone, tmp_path: Path
):
    adapter = write_nlu_adapter(tiny_llama.path, "seq", "prompt_tuning", tmp_path / "cls", 4, seed=3)
    tensors = load((adapter / "adapter_model.safetensors").read_bytes())
    tensors["prompt_embeddings"] = torch.full_like(tensors["prompt_embeddings"], 1e30)
    (adapter / "adapter_model.safetensors").write_bytes(save(tensors))
    with pytest.raises(InvalidTask, match="found the same final hidden states as a task of zeros"):
        engine.register_task("blank", *read_upload(adapter))


def read_upload(adapter: Path) -> tuple[bytes, bytes]:
    return (adapter / "adapter_config.json").read_bytes(), (adapter / "adapter_model.safetensors").read_bytes()


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
    assert any(step.batch_size >= 2 and step.num_distinct_tasks >= 1 for step in steps)  # probe rows beside the mate
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
