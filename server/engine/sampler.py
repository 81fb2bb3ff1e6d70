"""Chooses each row's next token from its logits, with the row's own sampling parameters, as tensor operations over
the whole batch (vLLM's sampler): temperature, top-k and top-p for every sampled row at once, and the draw as the
exponential race argmax(p / q), q ~ Exp(1), which picks token i with probability p_i.

Greedy rows take the argmax. A seeded request draws its q from its own generator, so its tokens never depend on its
batch mates; unseeded rows share one draw from the device's generator. Rows of a `mean` ensemble decide together:
one token from the average of the members' log-probabilities, fed to every member. The step's results come back to
the host in one transfer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.request import RankedTarget, Request, Sequence
from server.engine.types import SamplingParams

MIN_TEMPERATURE = 1e-5  # sampling this cold is greedy in all but name (vLLM's threshold too)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat completions' top_logprobs
SCORE_CHUNK_ELEMENTS = 1 << 24  # log-probabilities [rows, V] a scoring computes at once (64 MiB in float32)


@dataclass(frozen=True, slots=True)
class Sampled:
    """Per row: the chosen token, its log-probability, the most likely tokens when the row asks for them, and whether
    its logits were finite (a row whose logits are not cannot be trusted with its token)."""

    token_ids: list[int]
    logprobs: list[float]
    top: list[tuple[tuple[int, float], ...]]
    is_finite: list[bool]


@dataclass(frozen=True, slots=True)
class Decisions:
    """The batch's choices: one per row, but one per `mean` ensemble, whose rows all take its token."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    ensembles: list[list[int]]  # the rows of each `mean` ensemble
    decision_of_row: list[int] | None  # None: decision i is row i (no `mean` ensemble in the batch)

    @classmethod
    def of(cls, rows: list[Sequence]) -> Decisions:
        requests = [row.request for row in rows]
        if not any(request.is_lockstep for request in requests):
            return cls([request.sampling for request in requests], [request.generator for request in requests], [],
                       None)  # fmt: skip
        params: list[SamplingParams] = []
        generators: list[torch.Generator | None] = []
        ensembles: list[list[int]] = []
        decision_of_row = [0] * len(rows)
        for request, indices in rows_by_request(rows):
            members = [indices] if request.is_lockstep else [[i] for i in indices]
            for member_rows in members:
                for i in member_rows:
                    decision_of_row[i] = len(params)
                params.append(request.sampling)
                generators.append(request.generator)
            if request.is_lockstep:
                ensembles.append(indices)
        return cls(params, generators, ensembles, decision_of_row)


def sample(logits: torch.Tensor, rows: list[Sequence]) -> Sampled:
    """logits [B, V] (float32) -> one token per row. Log-probabilities are the model's own (before temperature,
    top-k and top-p), as vLLM and OpenAI report them; a `mean` ensemble reports the members' average."""
    decisions = Decisions.of(rows)
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
    scores = logits
    if decisions.decision_of_row is not None:
        scores, logprobs = ensemble_scores(logits, logprobs, decisions)
    tokens = choose(scores, decisions.params, decisions.generators)  # [D]
    if decisions.decision_of_row is not None:
        tokens = tokens[torch.tensor(decisions.decision_of_row, device=logits.device)]  # [B]
    chosen = logprobs.gather(1, tokens[:, None])  # [B, 1]
    is_finite = logits.amax(dim=-1, keepdim=True).isfinite()  # amax is NaN with any NaN, inf with any inf
    wanted = [row.request.sampling.top_logprobs or 0 for row in rows]
    asking = [i for i, n in enumerate(wanted) if n]  # the rows that ask for top log-probabilities
    k = min(max(wanted, default=0), logprobs.shape[-1])
    packed = torch.cat([tokens[:, None].double(), chosen.double(), is_finite.double()], dim=1)  # [B, 3]
    if k:
        top_values, top_ids = logprobs.index_select(0, torch.tensor(asking, device=logits.device)).topk(k, dim=-1)
        packed = torch.cat([packed.flatten(), top_ids.double().flatten(), top_values.double().flatten()])
    host = packed.cpu()  # the step's one transfer to the host
    return unpack(host, len(rows), [(i, wanted[i]) for i in asking], k)


def unpack(packed: torch.Tensor, num_rows: int, asking: list[tuple[int, int]], k: int) -> Sampled:
    """[B, 3] rows of (token, log-probability, is finite) on the host, and when rows ask for them (`asking`: each
    one's row and how many it wants) flattened and followed by their k top ids and k top log-probabilities ->
    Sampled, read by column (a list per row would cost a Python list per row)."""
    top: list[tuple[tuple[int, float], ...]] = [()] * num_rows
    if asking:
        ids, values = packed[3 * num_rows :].view(2, len(asking), k).tolist()
        for (row, n), row_ids, row_values in zip(asking, ids, values, strict=True):
            top[row] = tuple(zip(map(int, row_ids[:n]), row_values[:n], strict=True))
        packed = packed[: 3 * num_rows].view(num_rows, 3)
    token_ids = packed[:, 0].long().tolist()
    return Sampled(token_ids, packed[:, 1].tolist(), top, (packed[:, 2] == 1.0).tolist())


def ensemble_scores(
    logits: torch.Tensor, logprobs: torch.Tensor, decisions: Decisions
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decisions' scores [D, V] (a row's logits; an ensemble's mean log-probabilities) and the rows'
    log-probabilities [B, V], an ensemble's members reporting its mean."""
    assert decisions.decision_of_row is not None
    first_row = {decision: i for i, decision in reversed(list(enumerate(decisions.decision_of_row)))}
    scores = logits[torch.tensor([first_row[d] for d in range(len(decisions.params))], device=logits.device)]
    logprobs = logprobs.clone()
    for members in decisions.ensembles:
        index = torch.tensor(members, device=logits.device)
        mean_logprobs = logprobs.index_select(0, index).mean(dim=0)  # [V]
        scores[decisions.decision_of_row[members[0]]] = mean_logprobs
        logprobs[index] = mean_logprobs
    return scores, logprobs


def choose(
    scores: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """scores [D, V] (logits or log-probabilities) -> token ids [D]: the argmax for greedy rows; for sampled rows a
    draw after temperature, top-k and top-p."""
    tokens = scores.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if p.do_sample]
    if not sampled:
        return tokens
    device = scores.device
    index = torch.tensor(sampled, device=device)
    chosen = [params[i] for i in sampled]
    temperature = torch.tensor([max(p.temperature, MIN_TEMPERATURE) for p in chosen], device=device)
    filtered = scores.index_select(0, index) / temperature[:, None]  # below MIN_TEMPERATURE this overflows to inf
    if any(p.top_k > 0 or p.top_p < 1.0 for p in chosen):
        top_k = torch.tensor([p.top_k for p in chosen], device=device)
        top_p = torch.tensor([p.top_p for p in chosen], device=device)
        filtered = top_k_top_p_filter(filtered, top_k, top_p)
    probs = torch.softmax(filtered, dim=-1)
    noise = exponential_noise(probs, [generators[i] for i in sampled])
    return tokens.index_copy(0, index, (probs / noise).argmax(dim=-1))


def exponential_noise(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """q ~ Exp(1) [S, V]: a seeded row's from its own generator, the rest from one draw of the device's (for
    those rows only)."""
    noise = torch.empty_like(probs)
    unseeded = [row for row, generator in enumerate(generators) if generator is None]
    if len(unseeded) == len(generators):
        noise.exponential_()
    elif unseeded:
        noise[torch.tensor(unseeded, device=probs.device)] = torch.empty_like(noise[: len(unseeded)]).exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # a q of 0 would pick a token of probability 0


def top_k_top_p_filter(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """scores [S, V], top_k [S] (0: none), top_p [S] (1: none) -> scores with the dropped tokens at -inf. Top-k keeps
    the tokens scoring at least the k-th best; top-p then keeps the smallest set of the most likely tokens whose
    probability reaches top_p (always at least one). One sort for the whole batch."""
    vocab = scores.shape[-1]
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)  # [S, V]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    threshold = sorted_scores.gather(1, (k - 1)[:, None])  # [S, 1]
    drop_sorted = sorted_scores < threshold
    probs = torch.softmax(sorted_scores.masked_fill(drop_sorted, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop_sorted[:, 0] = False  # the most likely token stays, even when top_p rounds to 0 in float32
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


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


def rows_by_request(rows: list[Sequence]) -> list[tuple[Request, list[int]]]:
    groups: dict[int, tuple[Request, list[int]]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(id(row.request), (row.request, []))[1].append(i)
    return list(groups.values())


def score(logits: torch.Tensor, targets: list[int], rows: list[Sequence]) -> list[tuple[float, RankedTarget]]:
    """logits [K, V] (float32) of K scored positions -> each one's log-probability of its target token, and its rank
    and the most likely tokens for a row that asks for them; computed a few positions at a time, so no [K, V]
    temporary exists however many positions a step scores."""
    per_chunk = max(1, SCORE_CHUNK_ELEMENTS // logits.shape[-1])
    chosen, ranked = [], []
    for first in range(0, len(targets), per_chunk):
        logprobs = torch.log_softmax(logits[first : first + per_chunk], dim=-1)  # [k, V]
        target = torch.tensor(targets[first : first + per_chunk], device=logits.device)
        chosen.append(logprobs.gather(1, target[:, None])[:, 0])  # [k]
        ranked += ranks_and_top(logprobs, chosen[-1], rows[first : first + per_chunk])
    return list(zip(torch.cat(chosen).tolist(), ranked, strict=True))


def ranks_and_top(logprobs: torch.Tensor, chosen: torch.Tensor, rows: list[Sequence]) -> list[RankedTarget]:
    """logprobs [K, V], chosen [K] -> per scored position: the target's rank and the row's `top_logprobs` most
    likely (id, logprob); (0, ()) for rows that ask for neither (/v1/score's)."""
    wanted = [row.request.sampling.top_logprobs for row in rows]
    if all(k is None for k in wanted):
        return [(0, ())] * len(rows)
    ranks = ((logprobs > chosen[:, None]).sum(dim=-1) + 1).tolist()  # [K]
    k = min(max(k or 0 for k in wanted), logprobs.shape[-1])
    values, ids = (t.tolist() for t in logprobs.topk(k, dim=-1))  # [K, k]
    return [(ranks[i], tuple(zip(ids[i][: n or 0], values[i][: n or 0], strict=True))) for i, n in enumerate(wanted)]
