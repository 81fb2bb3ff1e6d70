"""Exact match on held-out pairs: greedy answers through the model's forward (server.engine.reference), decoded
as the server decodes them, compared with the expected output as the server would show it (ends stripped)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from server.engine.reference import forward_logits, greedy_uncached
from server.train.data import Pair

ROWS = 64  # prompts decoded together at most


@dataclass(frozen=True, slots=True)
class Score:
    correct: int
    total: int
    examples: tuple[tuple[str, str, str], ...]  # (input, expected, got) of a few misses

    @property
    def exact_match(self) -> float | None:
        return self.correct / self.total if self.total else None


def exact_match(
    model: Callable[..., object], tokenizer: PreTrainedTokenizerBase, pairs: list[Pair], device: torch.device
) -> Score:
    """Prompts of one length are decoded together; each row stops after its expected length plus a little."""
    answers = greedy_answers(model, tokenizer, pairs, device)
    expected = [as_served(pair.output, tokenizer) for pair in pairs]
    rows = zip(pairs, expected, answers, strict=True)
    misses = [(pair.input, want, got) for pair, want, got in rows if got.strip() != want.strip()]
    return Score(len(pairs) - len(misses), len(pairs), tuple(misses[:3]))


def as_served(text: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The expected output as the server would return it: special tokens in it (a separator) are not shown."""
    return decode(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    assert isinstance(text, str)  # one sequence in, one string out
    return text


@torch.inference_mode()
def greedy_answers(
    model: Callable[..., object], tokenizer: PreTrainedTokenizerBase, pairs: list[Pair], device: torch.device
) -> list[str]:
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    prompts = [list(tokenizer(pair.input)["input_ids"]) for pair in pairs]
    limits = [len(tokenizer(pair.output, add_special_tokens=False)["input_ids"]) + 4 for pair in pairs]
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt)].append(index)
    answers = [""] * len(pairs)
    groups = [same[start : start + ROWS] for same in by_length.values() for start in range(0, len(same), ROWS)]
    for indices in groups:
        input_ids = torch.tensor([prompts[i] for i in indices], device=device)
        generated = greedy_uncached(forward_logits(model), input_ids, max(limits[i] for i in indices), eos)
        for i, tokens in zip(indices, generated, strict=True):
            answers[i] = decode(tokenizer, tokens[: limits[i]])
    return answers
