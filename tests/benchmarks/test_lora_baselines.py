"""The LoRA preset's PEFT baselines do the work they claim: per adapter and in PEFT's own mixed `adapter_names=`
batch, every row's greedy tokens are those of its own adapter alone (PEFT's forward without a cache, unpadded), and
the tasks are strong enough that a row served with another task's adapter, or with none, would show it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks import workload
from benchmarks.peft_baseline import PeftServer
from benchmarks.workload import LORA, kind_of_task, one_task_per_group, shuffled_workload
from tests.benchmarks.tiny import write_tiny_backbone
from tests.reference import peft_greedy

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def lora_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[workload.TaskSpec]]:
    root = tmp_path_factory.mktemp("lora-world")
    backbone_dir = write_tiny_backbone("cpu-lora", root / "backbone")
    return backbone_dir, workload.write_lora_tasks(backbone_dir, root / "tasks", 4, ranks=(2, 4))


def references(backbone_dir: Path, tasks: list[workload.TaskSpec], texts: list[str]) -> dict[str | None, list]:
    """Per task (None: the bare backbone), each text's greedy tokens under PEFT's uncached forward, alone."""
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    ids = [tokenizer(text)["input_ids"] for text in texts]
    base = AutoModelForCausalLM.from_pretrained(backbone_dir).eval()
    out: dict[str | None, list] = {None: [peft_greedy(base, row, NEW_TOKENS) for row in ids]}
    for task in tasks:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(backbone_dir), task.adapter_dir).eval()
        out[task.task_id] = [peft_greedy(model, row, NEW_TOKENS) for row in ids]
    return out


@pytest.mark.parametrize("mixed", [False, True], ids=["per-adapter", "adapter_names"])
def test_peft_serves_each_row_with_its_own_lora(lora_world: tuple[Path, list[workload.TaskSpec]], mixed: bool):
    backbone_dir, tasks = lora_world
    jobs = shuffled_workload(random.Random(0), tasks, 3, (3, 12), NEW_TOKENS)
    expected = references(backbone_dir, tasks, [job.text for job in jobs.jobs])
    texts = [job.text for job in jobs.jobs]
    # the tasks differ from the backbone and from each other on these rows: a lost adapter would show
    assert all(expected[task.task_id] != expected[None] for task in tasks)
    assert len({str(expected[task.task_id]) for task in tasks}) == len(tasks)

    server = PeftServer(backbone_dir, tasks, "cpu", "float32")
    run = server.run_mixed(jobs, batch_size=5) if mixed else server.run(jobs)
    for i, job in enumerate(jobs.jobs):
        assert run.token_ids[i] == expected[job.task_id][texts.index(job.text)], (job.task_id, job.text)
    assert run.num_new_tokens == len(jobs.jobs) * NEW_TOKENS


def test_lora_tasks_are_what_peft_saves_cycling_through_ranks_and_targets(
    lora_world: tuple[Path, list[workload.TaskSpec]],
):
    _, tasks = lora_world
    assert [task.shape for task in tasks] == ["r2-attention", "r2-mlp", "r4-attention", "r4-mlp"]
    for task in tasks:
        config = json.loads((task.adapter_dir / "adapter_config.json").read_text())
        rank, targets = task.shape.removeprefix("r").split("-")
        assert (config["peft_type"], config["task_type"], config["r"]) == ("LORA", "CAUSAL_LM", int(rank))
        assert sorted(config["target_modules"]) == sorted(workload.LORA_TARGETS[targets])


def test_uniform_puts_each_request_on_the_first_task_of_its_kind(tmp_path: Path):
    tasks = [
        workload.TaskSpec("a", LORA, 0, tmp_path, "r8-mlp"),
        workload.TaskSpec("b", workload.PROMPT, 4, tmp_path),
        workload.TaskSpec("c", LORA, 0, tmp_path, "r16-mlp"),
        workload.TaskSpec("d", LORA, 0, tmp_path, "r8-mlp"),
        workload.TaskSpec("e", workload.PROMPT, 4, tmp_path),
    ]
    jobs = shuffled_workload(random.Random(0), tasks, 2, (3, 5), 1)
    uniform = one_task_per_group(jobs, tasks, kind_of_task)
    first = {"a": "a", "b": "b", "c": "c", "d": "a", "e": "b"}
    assert [job.task_id for job in uniform.jobs] == [first[str(job.task_id)] for job in jobs.jobs]
    assert [job.text for job in uniform.jobs] == [job.text for job in jobs.jobs]
