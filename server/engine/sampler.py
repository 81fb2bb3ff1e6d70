"""Chooses each row's next token from its logits, with the row's own sampling parameters.

Greedy rows take the argmax; sampled rows draw with their request's own seeded generator, so a row's
draws never depend on its batch mates. Rows of a `mean` ensemble decide together: one token from the
average of the members' log-probabilities, fed to every member.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.request import Request, Sequence
from server.engine.types import SamplingParams

MIN_TEMPERATURE = 1e-5  # sampling this cold is greedy in all but name (vLLM's threshold too)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat completions' top_logprobs


@dataclass(frozen=True, slots=True)
class Sampled:
    """Per row: the chosen token, its log-probability, and the most likely tokens when the row asks for them."""

    token_ids: list[int]
    logprobs: list[float]
    top: list[tuple[tuple[int, float], ...]]


def sample(logits: torch.Tensor, rows: list[Sequence]) -> Sampled:
    """logits [B, V] (float32) -> one token per row. Log-probabilities are the model's own (before temperature,
    top-k and top-p), as vLLM and OpenAI report them; a `mean` ensemble reports the members' average."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
    tokens = logits.argmax(dim=-1)  # [B]; greedy unless a row says otherwise
    for request, indices in rows_by_request(rows):
        if request.is_lockstep:
            index = torch.tensor(indices, device=logits.device)
            mean_logprobs = logprobs.index_select(0, index).mean(dim=0)  # [V]
            tokens[index] = choose(mean_logprobs, request.sampling, request.generator)
            logprobs[index] = mean_logprobs  # members report the ensemble's log-probability
        elif request.sampling.do_sample:
            for i in indices:
                tokens[i] = choose(logits[i], request.sampling, request.generator)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)  # [B]
    return Sampled(tokens.tolist(), chosen.tolist(), most_likely(logprobs, rows))


def suppress_eos(logits: torch.Tensor, rows: list[Sequence], eos_ids: frozenset[int]) -> torch.Tensor:
    """logits [B, V]: rows short of their `min_tokens` cannot end yet (vLLM's min_tokens), so their
    end-of-sequence tokens are masked out; the other rows' logits are untouched."""
    short = [i for i, row in enumerate(rows) if len(row.output_ids) < row.request.sampling.min_tokens]
    if not short or not eos_ids:
        return logits
    eos = [i for i in sorted(eos_ids) if i < logits.shape[-1]]
    masked = logits.clone()
    masked[torch.tensor(short, device=logits.device)[:, None], torch.tensor(eos, device=logits.device)[None]] = float(
        "-inf"
    )
    return masked


def most_likely(logprobs: torch.Tensor, rows: list[Sequence]) -> list[tuple[tuple[int, float], ...]]:
    """Each row's `top_logprobs` most likely tokens (one top-k over the batch, at the largest k asked for)."""
    wanted = [row.request.sampling.top_logprobs or 0 for row in rows]
    k = min(max(wanted, default=0), logprobs.shape[-1])
    if k == 0:
        return [() for _ in rows]
    values, ids = (t.tolist() for t in logprobs.topk(k, dim=-1))
    return [tuple(zip(ids[i][:n], values[i][:n], strict=True)) for i, n in enumerate(wanted)]


def rows_by_request(rows: list[Sequence]) -> list[tuple[Request, list[int]]]:
    groups: dict[int, tuple[Request, list[int]]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(id(row.request), (row.request, []))[1].append(i)
    return list(groups.values())


def choose(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """scores [V] (logits or log-probabilities) -> a token id tensor."""
    if not params.do_sample:
        return scores.argmax()
    temperature = max(params.temperature, MIN_TEMPERATURE)  # below it, scores / temperature overflows to inf
    filtered = top_p_filter(top_k_filter(scores / temperature, params.top_k), params.top_p)
    probs = torch.softmax(filtered, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[0]


def top_k_filter(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= scores.shape[-1]:
        return scores
    threshold = torch.topk(scores, top_k).values[-1]
    return scores.masked_fill(scores < threshold, float("-inf"))


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (always at least one)."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=True)
    cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - torch.softmax(sorted_scores, dim=-1) >= top_p  # mass before this token
    drop_sorted[0] = False  # the most likely token stays, even when top_p rounds to 0 in float32
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))
