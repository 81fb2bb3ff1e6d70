"""The one training loop: batches of token ids with a loss span, AdamW with warm-up and cosine decay, a progress
bar, and atomic output. `promptserve train` and the demo's own pre-training and task training all run it.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

IGNORE_INDEX = -100

Example = tuple[list[int], int]  # token ids and the index of the first id the loss covers


@dataclass(frozen=True, slots=True)
class Batch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE_INDEX where no loss


class Diverged(ArithmeticError):
    """The loss stopped being a finite number; the message says at which step."""


def make_deterministic(seed: int, strict: bool = False) -> random.Random:
    """Seed torch and return the Python RNG that draws the data: same seed, same weights, bit for bit.

    `strict`: fail on an operation with no deterministic implementation (the demo's CPU scripts) rather than
    warn (`promptserve train` on whatever GPU it meets)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS repeats itself only with a fixed workspace
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=not strict)
    return random.Random(seed)


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad `(token_ids, loss_start)` pairs; the loss covers ids from `loss_start` on."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, loss_start) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, loss_start : len(ids)] = torch.tensor(ids[loss_start:])
    return Batch(input_ids, attention_mask, labels)


def bucketed(examples: list[Example], rng: random.Random, batch_size: int, pad_id: int) -> list[Batch]:
    """Batches of examples of similar length (about half the padding: twice the speed on a CPU), in random order."""
    ordered = sorted(examples, key=lambda example: len(example[0]))
    chunks = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    rng.shuffle(chunks)
    return [collate(chunk, pad_id) for chunk in chunks]


def sampled_batches(
    sample: Callable[[], Example], rng: random.Random, batch_size: int, pool: int, pad_id: int
) -> Iterator[Batch]:
    """Endless batches of freshly sampled examples (synthetic data), `pool` batches bucketed at a time."""
    while True:
        yield from bucketed([sample() for _ in range(batch_size * pool)], rng, batch_size, pad_id)


def epoch_batches(examples: list[Example], rng: random.Random, batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Endless epochs over a data set, each shuffled anew, bucketed by length within pools of 8 batches."""
    pool = batch_size * 8
    while True:
        shuffled = rng.sample(examples, len(examples))
        for start in range(0, len(shuffled), pool):
            yield from bucketed(shuffled[start : start + pool], rng, batch_size, pad_id)


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
    progress: bool | None = None,
) -> list[float]:
    """AdamW with gradient clipping; returns every step's loss, or raises Diverged on one that is not finite.
    `progress`: a bar with the loss and steps per second (None: only on a terminal). Ctrl-C propagates: the
    caller writes nothing it had not finished."""
    optimizer = torch.optim.AdamW(parameters, lr=peak_lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    losses: list[float] = []
    disable = None if progress is None else not progress
    with tqdm(total=num_steps, unit="step", disable=disable, dynamic_ncols=True) as bar:
        for step in range(num_steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, num_steps, peak_lr, warmup)
            loss = loss_of(next(batches))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise Diverged(f"the loss became {losses[-1]} at step {step + 1}; try a lower learning rate")
            recent = losses[-50:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
            bar.update()
    return losses


def replace_dir(build: Callable[[Path], None], target: Path) -> Path:
    """Build a directory in a staging place next to `target`, then swap it in: a reader, or a run interrupted at
    any point, sees the previous directory or the new one, never a half-written one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    previous = staging.with_name(staging.name + ".previous")
    try:
        build(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; what it holds is read by whoever runs the server
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists():
            target.rename(previous)
        staging.rename(target)
    finally:
        if previous.exists() and not target.exists():
            previous.rename(target)  # interrupted between the two renames: the previous directory stays
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)
    return target
