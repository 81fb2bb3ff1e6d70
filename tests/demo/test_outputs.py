"""The demo tasks do what the README says on held-out inputs: same frozen backbone, different task, different
output (greedy, through PEFT's forward without a cache, as `server.demo.evaluate` scores them)."""

from __future__ import annotations

import math

import pytest
from peft import PeftModel
from transformers import PreTrainedModel

from server.demo import DEMO_BACKBONE_DIR, DEMO_TASKS
from server.demo.evaluate import greedy_answers, held_out_inputs, load_backbone, score
from server.demo.tasks import DEMO_TASK_SPECS, TRANSFORMATIONS, encode_bytes
from server.engine.default_backbone import BOS_ID

# Held-out exact match from `python -m server.demo.evaluate` (200 inputs), as docs/demo.md reports it.
REPORTED_ACCURACY = {"upper": 0.99, "reverse": 0.98, "json": 0.97}
README_EXAMPLE = {
    "upper": "HELLO WORLD",
    "reverse": "dlrow olleh",
    "json": '{"text": "hello world"}',
    None: "hello world",  # the bare backbone echoes
}


@pytest.fixture
def backbone() -> PreTrainedModel:
    return load_backbone(DEMO_BACKBONE_DIR)


def with_task(backbone: PreTrainedModel, task_id: str | None) -> PreTrainedModel | PeftModel:
    return backbone if task_id is None else PeftModel.from_pretrained(backbone, DEMO_TASKS[task_id]).eval()


@pytest.mark.parametrize("task", DEMO_TASK_SPECS, ids=lambda t: t.task_id)
def test_task_matches_its_reported_accuracy_on_held_out_inputs(task, backbone: PreTrainedModel) -> None:
    inputs = held_out_inputs(5, seed=99)
    result = score(with_task(backbone, task.task_id), task.transformation, inputs)
    assert result.correct >= math.floor(REPORTED_ACCURACY[task.task_id] * len(inputs)), result.failures


@pytest.mark.parametrize("task_id", list(README_EXAMPLE), ids=str)
def test_readme_example_hello_world(task_id: str | None, backbone: PreTrainedModel) -> None:
    prompt = [BOS_ID, *encode_bytes("hello world")]
    (answer,) = greedy_answers(with_task(backbone, task_id), [prompt], [32])
    assert answer == README_EXAMPLE[task_id]


def test_outputs_differ_by_task_on_the_same_backbone() -> None:
    assert len(set(README_EXAMPLE.values())) == len(README_EXAMPLE)
    assert README_EXAMPLE["reverse"] == TRANSFORMATIONS["reverse"].apply("hello world")
