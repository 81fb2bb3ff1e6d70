"""Train the demo tasks with PEFT on the FROZEN demo backbone; save them into server/demo/assets/tasks/<task_id>.

The examples carry no instruction phrase: `<s> hello world <s> HELLO WORLD </s>` is all a task sees, so what
the task is lives in its virtual tokens alone. Run after `python -m server.demo.pretrain`:
`python -m server.demo.train_tasks` (about 1.5 minutes on one CPU thread).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from peft import (
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
)
from transformers import AutoModelForCausalLM

from server.demo.tasks import DEMO_TASK_SPECS, TRANSFORMATIONS, DemoTask, encode_example, sample_input
from server.demo.training import (
    BACKBONE_DIR,
    DEFAULT_THREADS,
    TASKS_DIR,
    Batch,
    Example,
    bucketed_batches,
    make_deterministic,
    replace_dir,
    train_loop,
)

BASE_MODEL_NAME = "promptserve/default"  # the model id the server reports for the built-in default backbone
PEAK_LR = {"prompt_tuning": 3e-2, "p_tuning": 3e-3, "prefix_tuning": 3e-3}


def peft_config_for(task: DemoTask) -> PeftConfig:
    size = task.num_virtual_tokens
    if task.method == "prompt_tuning":  # initialised from sampled vocabulary embeddings, as Lester et al. advise
        return PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=size, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB
        )
    if task.method == "p_tuning":  # MLP reparameterisation; the saved prompt is the MLP's output
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=size, encoder_hidden_size=128)
    if task.method == "prefix_tuning":  # Li & Liang's MLP over the prefix, dropped on save
        return PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=size, prefix_projection=True, encoder_hidden_size=128
        )
    raise ValueError(f"unknown method {task.method!r}")


def sample_example(task: DemoTask, rng: random.Random) -> Example:
    text = sample_input(rng, held_out=False)
    return encode_example("", text, TRANSFORMATIONS[task.transformation].apply(text))


def save_adapter(model: PeftModel, target: Path) -> Path:
    """PEFT's own layout, nothing else: adapter_config.json + adapter_model.safetensors."""

    def build(directory: Path) -> None:
        model.save_pretrained(str(directory))
        (directory / "README.md").unlink(missing_ok=True)
        config_path = directory / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = BASE_MODEL_NAME
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return replace_dir(build, target)


def train_task(task: DemoTask, backbone_dir: Path, out_dir: Path, steps: int, batch_size: int, seed: int) -> Path:
    rng = make_deterministic(seed)
    backbone = AutoModelForCausalLM.from_pretrained(backbone_dir, dtype=torch.float32)
    model = get_peft_model(backbone, peft_config_for(task))  # freezes every backbone weight
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"{task.task_id}: {task.method}, {sum(p.numel() for p in trainable)} trainable parameters")

    def loss_of(batch: Batch) -> torch.Tensor:
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss

    batches = bucketed_batches(lambda: sample_example(task, rng), rng, batch_size, pool=8)
    train_loop(trainable, loss_of, batches, steps, PEAK_LR[task.method], warmup=30)
    return save_adapter(model.eval(), out_dir / task.task_id)


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
