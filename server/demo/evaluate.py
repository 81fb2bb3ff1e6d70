"""Measure each demo task's exact-match accuracy on held-out inputs (greedy, through PEFT's forward).

Run: `python -m server.demo.evaluate`. Inputs are drawn from the side of the hash split that no training step
ever saw. For reference it also scores the backbone given the instruction phrase instead of the prompt, and the
bare backbone (which echoes) against each task's target.
"""

from __future__ import annotations

import argparse
import random
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as transformers_logging

from server.demo.tasks import (
    DEMO_TASK_SPECS,
    MAX_INPUT_CHARS,
    TRANSFORMATIONS,
    DemoTask,
    decode_answer,
    encode_bytes,
    sample_input,
)
from server.demo.training import BACKBONE_DIR, DEFAULT_THREADS, TASKS_DIR
from server.engine.default_backbone import BOS_ID, EOS_ID
from server.engine.reference import forward_logits, greedy_uncached


@dataclass(frozen=True, slots=True)
class Score:
    correct: int
    total: int
    failures: tuple[tuple[str, str, str], ...]  # (input, expected, got)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def load_backbone(directory: Path = BACKBONE_DIR) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def held_out_inputs(num: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    return [sample_input(rng, held_out=True) for _ in range(num)]


def greedy_answers(
    model: PreTrainedModel | PeftModel, prompts: Sequence[list[int]], max_new_tokens: Sequence[int]
) -> list[str]:
    """Greedy answers, batching only prompts of equal length; row i stops by max_new_tokens[i].

    PEFT's forward over the whole sequence at every step (server.engine.reference), not `generate`: PEFT 0.21's
    generate is wrong on transformers 5.24 and later. No padding: PEFT ignores position ids, so a left-padded row
    would see a gap between its virtual tokens and its input that it never saw in training.
    """
    answers = [""] * len(prompts)
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt)].append(index)
    for indices in by_length.values():
        input_ids = torch.tensor([prompts[i] for i in indices])
        limit = max(max_new_tokens[i] for i in indices)
        generated = greedy_uncached(forward_logits(model), input_ids, limit, {EOS_ID})
        for i, tokens in zip(indices, generated, strict=True):
            answers[i] = decode_answer(tokens[: max_new_tokens[i]])
    return answers


def score(model: PreTrainedModel | PeftModel, transformation: str, inputs: list[str], cue: str = "") -> Score:
    expected = [TRANSFORMATIONS[transformation].apply(text) for text in inputs]
    prompts = [[*encode_bytes(cue), BOS_ID, *encode_bytes(text)] for text in inputs]
    # <s> answer </s>, and one token of slack: anything longer cannot be an exact match anyway
    got = greedy_answers(model, prompts, [len(encode_bytes(answer)) + 3 for answer in expected])
    failures = tuple((i, e, g) for i, e, g in zip(inputs, expected, got, strict=True) if e != g)
    return Score(len(inputs) - len(failures), len(inputs), failures)


def score_task(backbone: PreTrainedModel, task: DemoTask, inputs: list[str], tasks_dir: Path = TASKS_DIR) -> Score:
    """Wraps `backbone` (prompt learning injects nothing into it); pass a fresh one per task."""
    return score(PeftModel.from_pretrained(backbone, tasks_dir / task.task_id).eval(), task.transformation, inputs)


def quiet_libraries() -> None:
    """Keep the table readable: no progress bars, no notices about what this script does on purpose."""
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Position ids are not supported")  # we never pad, see greedy_answers
    warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num", type=int, default=200, help="held-out inputs per task")
    parser.add_argument("--backbone", type=Path, default=BACKBONE_DIR)
    parser.add_argument("--tasks", type=Path, default=TASKS_DIR)
    parser.add_argument("--show-failures", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(DEFAULT_THREADS)
    quiet_libraries()
    inputs = held_out_inputs(args.num)
    print(f"{'task':<9}{'method':<15}{'virtual':>8}{'prompt only':>13}{'instruction':>13}{'bare':>7}")
    for task in DEMO_TASK_SPECS:
        backbone = load_backbone(args.backbone)
        bare = score(backbone, task.transformation, inputs)
        cue = score(backbone, task.transformation, inputs, TRANSFORMATIONS[task.transformation].instructions[0])
        prompt = score_task(backbone, task, inputs, args.tasks)
        print(
            f"{task.task_id:<9}{task.method:<15}{task.num_virtual_tokens:>8}"
            f"{prompt.accuracy:>13.1%}{cue.accuracy:>13.1%}{bare.accuracy:>7.1%}"
        )
        for text, expected, got in prompt.failures[: args.show_failures]:
            print(f"    {text!r}: expected {expected!r}, got {got!r}")
    print(f"{args.num} held-out inputs of up to {MAX_INPUT_CHARS} characters per task, greedy, exact match.")
    print("prompt only: the task's virtual tokens, no instruction; instruction: the bare backbone given the")
    print("instruction phrase instead (what pre-training taught it); bare: the bare backbone, no phrase (it echoes).")


if __name__ == "__main__":
    main()
