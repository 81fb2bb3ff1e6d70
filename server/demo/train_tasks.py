"""Train the demo tasks with PEFT on the FROZEN demo backbone; save them into server/demo/assets/tasks/<task_id>.

The examples carry no instruction phrase: `<s> hello world <s> HELLO WORLD </s>` is all a task sees, so what
the task is lives in its virtual tokens alone. Run after `python -m server.demo.pretrain`:
`python -m server.demo.train_tasks` (about 1.5 minutes on one CPU thread).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from server.demo.tasks import DEMO_TASK_SPECS, TRANSFORMATIONS, DemoTask, encode_example, sample_input
from server.demo.training import BACKBONE_DIR, DEFAULT_THREADS, TASKS_DIR
from server.engine.default_backbone import PAD_ID
from server.train.loop import Batch, Example, make_deterministic, sampled_batches, train_loop
from server.train.methods import METHODS, PEFT_NAMES, peft_config, save_adapter

BASE_MODEL_NAME = "promptserve/default"  # the model id the server reports for the built-in default backbone
METHOD_OF = {peft: method for method, peft in PEFT_NAMES.items()}  # the demo's specs spell methods as PEFT does
ENCODER_HIDDEN_SIZE = 128


def sample_example(task: DemoTask, rng: random.Random) -> Example:
    text = sample_input(rng, held_out=False)
    return encode_example("", text, TRANSFORMATIONS[task.transformation].apply(text))


def train_task(task: DemoTask, backbone_dir: Path, out_dir: Path, steps: int, batch_size: int, seed: int) -> Path:
    rng = make_deterministic(seed, strict=True)
    backbone = AutoModelForCausalLM.from_pretrained(backbone_dir, dtype=torch.float32)
    method = METHODS[METHOD_OF[task.method]]
    config = peft_config(method.name, task.num_virtual_tokens, ENCODER_HIDDEN_SIZE)
    model = get_peft_model(backbone, config)  # freezes every backbone weight
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"{task.task_id}: {task.method}, {sum(p.numel() for p in trainable)} trainable parameters")

    def loss_of(batch: Batch) -> torch.Tensor:
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss

    batches = sampled_batches(lambda: sample_example(task, rng), rng, batch_size, pool=8, pad_id=PAD_ID)
    losses = train_loop(trainable, loss_of, batches, steps, method.learning_rate, warmup=30)
    print(f"  final loss {sum(losses[-100:]) / len(losses[-100:]):.4f}")
    return save_adapter(model.eval(), out_dir / task.task_id, BASE_MODEL_NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--backbone", type=Path, default=BACKBONE_DIR)
    parser.add_argument("--out", type=Path, default=TASKS_DIR)
    parser.add_argument("--only", nargs="*", help="task ids to train (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    for index, task in enumerate(DEMO_TASK_SPECS):
        if args.only and task.task_id not in args.only:
            continue
        path = train_task(task, args.backbone, args.out, args.steps, args.batch_size, args.seed + index)
        print(f"  saved to {path}")
    print(f"trained in {time.monotonic() - start:.0f}s")


if __name__ == "__main__":
    main()
