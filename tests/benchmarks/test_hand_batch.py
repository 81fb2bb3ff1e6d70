"""The hand-written mixed batch does the work it claims: in one padded `generate`, prompt-tuning rows (embeddings
before their text) and prefix rows (keys and values stacked into one cache), of tasks with different numbers of
virtual tokens and inputs of different lengths, each get the greedy tokens of their own task alone (PEFT's forward
without a cache, unpadded), and the tasks are strong enough that a row served with another task would show it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks import workload
from benchmarks.hand_batch import HandBatch
from benchmarks.workload import shuffled_workload
from tests.benchmarks.tiny import write_tiny_backbone
from tests.reference import peft_greedy

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def prompt_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[workload.TaskSpec]]:
    root = tmp_path_factory.mktemp("prompt-world")
    backbone_dir = write_tiny_backbone("cpu", root / "backbone")
    short = workload.write_tasks(backbone_dir, root / "short", 2, num_virtual_tokens=3, prefix="short-")
    long = workload.write_tasks(backbone_dir, root / "long", 2, num_virtual_tokens=7, prefix="long-")
    return backbone_dir, [*short, *long]  # prompt and prefix tasks of 3 and of 7 virtual tokens


def alone(backbone_dir: Path, task: workload.TaskSpec, input_ids: list[int]) -> list[int]:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(backbone_dir), task.adapter_dir).eval()
    return peft_greedy(model, input_ids, NEW_TOKENS)


def test_one_mixed_generate_gives_every_row_its_own_tasks_tokens(prompt_world):
    backbone_dir, tasks = prompt_world
    jobs = shuffled_workload(random.Random(0), tasks, 2, (3, 12), NEW_TOKENS)
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    task_of = {task.task_id: task for task in tasks}
    expected = [alone(backbone_dir, task_of[str(job.task_id)], tokenizer(job.text)["input_ids"]) for job in jobs.jobs]
    others = [alone(backbone_dir, tasks[(tasks.index(task_of[str(job.task_id)]) + 1) % len(tasks)],
                    tokenizer(job.text)["input_ids"]) for job in jobs.jobs]  # fmt: skip
    assert sum(e != o for e, o in zip(expected, others, strict=True)) >= len(jobs.jobs) - 1  # a swapped task shows

    run = HandBatch(backbone_dir, tasks, "cpu", "float32").run(jobs, batch_size=len(jobs.jobs))
    assert run.token_ids == expected
    assert run.num_new_tokens == len(jobs.jobs) * NEW_TOKENS
