"""Pre-train the demo backbone on a synthetic multi-task mixture and save it into server/demo/assets/backbone.

An instruction phrase before the input ("upper:", "reverse:", ...) selects the transformation; with no phrase
the model echoes its input. Run: `python -m server.demo.pretrain` (about 15 minutes on one CPU thread).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from server.demo.tasks import TRANSFORMATIONS, encode_example, sample_input
from server.demo.training import BACKBONE_DIR, DEFAULT_THREADS
from server.engine.default_backbone import PAD_ID, byte_tokenizer, default_backbone_config
from server.train.loop import Batch, Example, make_deterministic, replace_dir, sampled_batches, train_loop


def sample_example(rng: random.Random) -> Example:
    transformation = rng.choice(list(TRANSFORMATIONS.values()))
    cue = rng.choice(transformation.instructions) if transformation.instructions else ""
    text = sample_input(rng, held_out=False)
    return encode_example(cue, text, transformation.apply(text))


def save_backbone(model: PreTrainedModel, target: Path) -> Path:
    """Stored in bfloat16 (half the bytes); prompts are then trained against these exact rounded weights."""

    def build(directory: Path) -> None:
        model.bfloat16().save_pretrained(directory)
        byte_tokenizer().save_pretrained(directory)

    return replace_dir(build, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--out", type=Path, default=BACKBONE_DIR)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    rng = make_deterministic(args.seed, strict=True)
    model = AutoModelForCausalLM.from_config(default_backbone_config())
    model.train()
    print(f"pre-training a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter Llama (GQA)")
    start = time.monotonic()

    def loss_of(batch: Batch) -> torch.Tensor:
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss

    losses = train_loop(
        list(model.parameters()),
        loss_of,
        sampled_batches(lambda: sample_example(rng), rng, args.batch_size, pool=16, pad_id=PAD_ID),
        args.steps,
        args.lr,
        warmup=100,
        weight_decay=0.01,
    )
    print(f"pre-trained in {time.monotonic() - start:.0f}s, final loss {sum(losses[-100:]) / len(losses[-100:]):.4f}")
    print(f"saved to {save_backbone(model.eval(), args.out)}")


if __name__ == "__main__":
    main()
