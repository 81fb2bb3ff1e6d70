"""Exact match on held-out pairs: greedy answers through the model's forward (server.engine.reference's loop),
decoded as the server decodes them, compared with the expected output as the server would show it."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from server.engine.reference import LogitsOf, greedy_uncached
from server.train.data import Pair, input_ids, output_ids

ROWS = 64  # prompts decoded together at most
SLACK = 4  # tokens past the expected answer's length: a longer answer is wrong whatever follows


@dataclass(frozen=True, slots=True)
class Score:
    correct: int
    total: int
    examples: tuple[tuple[str, str, str], ...]  # (input, expected, got) of a few misses

    @property
    def exact_match(self) -> float | None:
        return self.correct / self.total if self.total else None


def exact_match(
    model: Callable[..., object],
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Pair],
    eos_token_ids: Collection[int],
    progress: bool | None = None,
) -> Score:
    answers = greedy_answers(model, tokenizer, pairs, eos_token_ids, progress)
    expected = [as_served(pair, tokenizer, eos_token_ids) for pair in pairs]
    rows = zip(pairs, expected, answers, strict=True)
    misses = [(pair.input, want, got) for pair, want, got in rows if got.strip() != want.strip()]
    return Score(len(pairs) - len(misses), len(pairs), tuple(misses[:3]))


def as_served(pair: Pair, tokenizer: PreTrainedTokenizerBase, eos_token_ids: Collection[int]) -> str:
    """The expected output as the server would return it: special tokens in it (a separator) are not shown."""
    return decode(tokenizer, output_ids(pair, tokenizer, eos_token_ids))


def decode(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    assert isinstance(text, str)  # one sequence in, one string out
    return text


def last_logits(model: Callable[..., object]) -> LogitsOf:
    """The model's next-token logits for the whole sequence each time (no cache), keeping the last position only."""

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        output = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
        return output.logits  # type: ignore[attr-defined,no-any-return]

    return logits_of


@torch.inference_mode()
def greedy_answers(
    model: Callable[..., object],
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[Pair],
    eos_token_ids: Collection[int],
    progress: bool | None = None,
) -> list[str]:
    """Prompts of one length are decoded together. Each row stops at an end-of-sequence token the server stops
    at, or a little past the expected answer's length; with no such token, at exactly that length."""
    device = next(model.parameters()).device  # type: ignore[attr-defined]
    prompts = [input_ids(pair, tokenizer) for pair in pairs]
    slack = SLACK if eos_token_ids else 0
    limits = [len(output_ids(pair, tokenizer, eos_token_ids)) + slack for pair in pairs]
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt)].append(index)
    groups = [same[start : start + ROWS] for same in by_length.values() for start in range(0, len(same), ROWS)]
    answers = [""] * len(pairs)
    disable = None if progress is None else not progress
    for indices in tqdm(groups, desc="evaluating", unit="batch", disable=disable, leave=False):
        ids = torch.tensor([prompts[i] for i in indices], device=device)
        generated = greedy_uncached(last_logits(model), ids, max(limits[i] for i in indices), eos_token_ids)
        for i, tokens in zip(indices, generated, strict=True):
            answers[i] = decode(tokenizer, tokens[: limits[i]])
    return answers
