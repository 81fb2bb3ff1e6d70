"""Greedy decoding by the book: the whole sequence through a model's forward at every step, no cache.

The yardstick the engine is held to (its start-up self-check, the tests, the demo's evaluation). Nothing here
depends on how a cache reaches a model or on `generate`, so it cannot share a bug in that plumbing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from importlib.metadata import PackageNotFoundError, version

import torch
from packaging.version import Version

LogitsOf = Callable[[torch.Tensor], torch.Tensor]  # token ids [B, T] -> logits [B, T', V], the last T' for the last id


def forward_logits(model: Callable[..., object]) -> LogitsOf:
    """A model (a transformers or PEFT causal LM) as a LogitsOf: the whole sequence every time, every position kept."""

    def logits_of(input_ids: torch.Tensor) -> torch.Tensor:
        output = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        return output.logits  # type: ignore[attr-defined]

    return logits_of


@torch.inference_mode()
def greedy_uncached(
    logits_of: LogitsOf, input_ids: torch.Tensor, max_new_tokens: int, eos_token_ids: Collection[int]
) -> list[list[int]]:
    """Each row's greedy tokens after `input_ids` [B, T] (rows of one length), through its first EOS."""
    generated: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    for _ in range(max_new_tokens):
        next_ids = logits_of(input_ids)[:, -1].argmax(dim=-1)  # [B]
        for row, token in zip(generated, next_ids.tolist(), strict=True):
            if not is_done(row, eos_token_ids):
                row.append(token)
        if all(is_done(row, eos_token_ids) for row in generated):
            break
        input_ids = torch.cat([input_ids, next_ids[:, None].to(input_ids.device)], dim=1)  # [B, T + 1]
    return generated


def is_done(tokens: list[int], eos_token_ids: Collection[int]) -> bool:
    return bool(tokens) and tokens[-1] in eos_token_ids


def peft_generate_broken_reason() -> str | None:
    """Why PEFT's own `generate` cannot be a reference here, or None where it is known right.

    transformers 5.24 renamed the cache argument of `generate` (`past_key_values` -> `cache`); PEFT 0.21.2 and older
    read only the old name, so their prompt rows re-inject the virtual tokens at every step and prefix rows lose
    the prefix. The tests compare with PEFT's forward instead; the benchmarks' PEFT baseline needs a right one.
    """
    try:
        transformers, peft = Version(version("transformers")), Version(version("peft"))
    except PackageNotFoundError:
        return "PEFT is not installed"
    if transformers >= Version("5.24") and peft <= Version("0.21.2"):
        return f"PEFT {peft}'s generate is wrong on transformers {transformers} (cache argument renamed)"
    return None


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword a transformers model's forward takes its cache by: `cache` since transformers 5.24,
    `past_key_values` before (the lock's range starts at 5.3)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
