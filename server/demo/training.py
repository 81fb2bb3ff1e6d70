"""Small training helpers shared by the demo's pre-training and prompt-learning scripts (CPU, seeded)."""

from __future__ import annotations

import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from server.demo import ASSETS_DIR
from server.engine.default_backbone import PAD_ID, PRETRAINED_BACKBONE_DIR

BACKBONE_DIR = PRETRAINED_BACKBONE_DIR
TASKS_DIR = ASSETS_DIR / "tasks"
IGNORE_INDEX = -100


Example = tuple[list[int], int]  # token ids and the index of the first id the loss covers


@dataclass(frozen=True, slots=True)
class Batch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE_INDEX where no loss


DEFAULT_THREADS = 1  # two threads gave the same weights wherever compared, but thrash (20x slower) on a busy 2-core box


def make_deterministic(seed: int) -> random.Random:
    """Seed torch and return the Python RNG that draws the data: same seed, same weights, bit for bit."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    return random.Random(seed)


def collate(examples: list[Example]) -> Batch:
    """Right-pad `(token_ids, loss_start)` pairs; the loss covers ids from `loss_start` on."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, loss_start) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, loss_start : len(ids)] = torch.tensor(ids[loss_start:])
    return Batch(input_ids, attention_mask, labels)


def bucketed_batches(sample: Callable[[], Example], rng: random.Random, batch_size: int, pool: int) -> Iterator[Batch]:
    """Endless batches; examples of similar length share one (about half the padding: twice the speed on CPU)."""
    while True:
        examples = sorted((sample() for _ in range(batch_size * pool)), key=lambda example: len(example[0]))
        chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
        rng.shuffle(chunks)
        yield from (collate(chunk) for chunk in chunks)


def lr_at(step: int, num_steps: int, peak_lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, num_steps - warmup)
    return peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(
    parameters: list[torch.nn.Parameter],
    loss_of: Callable[[Batch], torch.Tensor],
    batches: Iterator[Batch],
    num_steps: int,
    peak_lr: float,
    warmup: int = 50,
    weight_decay: float = 0.0,
    log_every: int = 100,
) -> float:
    """AdamW with clipping; returns the mean loss over the last `log_every` steps."""
    optimizer = torch.optim.AdamW(parameters, lr=peak_lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    start, recent = time.monotonic(), list[float]()
    for step in range(num_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, num_steps, peak_lr, warmup)
        loss = loss_of(next(batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = [*recent[-(log_every - 1) :], loss.item()]
        if (step + 1) % log_every == 0 or step + 1 == num_steps:
            mean = sum(recent) / len(recent)
            print(f"  step {step + 1:5d}/{num_steps}  loss {mean:.4f}  {time.monotonic() - start:6.1f}s", flush=True)
    return sum(recent) / len(recent)


def replace_dir(build: Callable[[Path], None], target: Path) -> Path:
    """Build a directory in a staging place next to `target`, then swap it in."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the assets are read by whoever runs the server
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
