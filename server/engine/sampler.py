"""Chooses each row's next token from its logits, with the row's own sampling parameters, as tensor operations over
the whole batch (vLLM's sampler): temperature, top-k and top-p for every sampled row at once, then the draw by
inverting the row's cumulative distribution at its own uniform u (one random number a row, not one per token).

Greedy rows take the argmax. A seeded request's row draws its u from its own generator, so its tokens never depend on
its batch mates; unseeded rows share one draw from torch's generator. The draws are made on the host before the
sampling (`draws`), so a retry request by request uses the same ones, and reach the device with the sampled rows'
parameters in one copy. Rows of a `mean` ensemble decide together: one token from the average of the members'
log-probabilities, fed to every member. The step's results come back to the host in one transfer.

Sampled rows are filtered and drawn a few at a time, so the filters' and the draw's temporaries do not grow with the
batch times the vocabulary (the step's log-probabilities [B, V] do: the KV pool's sizing profiles them), and over a
large vocabulary a draw is inverted in two steps (its block of tokens, then its token), so the float64 running sum
runs over the blocks and one block, not the vocabulary. On the host the ranking and the argmax are numpy's:
vectorised, where torch's CPU `topk`, `sort` and argmax are scalar loops (`python -m benchmarks.sampler` times it all
over real vocabularies).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from server.engine.kv_pool import HOST, double_tensor, from_array, long_tensor, to_device
from server.engine.request import RankedTarget, Request, Sequence
from server.engine.types import SamplingParams

MIN_TEMPERATURE = 1e-5  # sampling this cold is greedy in all but name (vLLM's threshold too)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat completions' top_logprobs
SCORE_CHUNK_ELEMENTS = 1 << 24  # log-probabilities [rows, V] a scoring computes at once (64 MiB in float32)
SAMPLE_CHUNK_ELEMENTS = 1 << 24  # scores [rows, V] sampled at once on a GPU (64 MiB in float32; few launches)
HOST_SAMPLE_CHUNK_ELEMENTS = 1 << 21  # on the host (8 MiB: temporaries that stay in the heap, not fresh pages)
CDF_BLOCK = 1024  # tokens a block when a draw is inverted in two steps (`invert`)
WHOLE_SORT_MAX_VOCAB = 512  # up to here numpy sorts a row whole faster than it partitions it (~36 µs for 128 rows)


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
    first_rows: list[int] | None  # each decision's first row, whose draw it takes; None: decision i is row i
    ensembles: list[list[int]]  # the rows of each `mean` ensemble
    decision_of_row: list[int] | None  # None: decision i is row i (no `mean` ensemble in the batch)

    @classmethod
    def of(cls, rows: list[Sequence]) -> Decisions:
        requests = [row.request for row in rows]
        if not any(request.is_lockstep for request in requests):
            return cls([request.sampling for request in requests], None, [], None)
        params: list[SamplingParams] = []
        first_rows: list[int] = []
        ensembles: list[list[int]] = []
        decision_of_row = [0] * len(rows)
        for request, indices in rows_by_request(rows):
            members = [indices] if request.is_lockstep else [[i] for i in indices]
            for member_rows in members:
                for i in member_rows:
                    decision_of_row[i] = len(params)
                params.append(request.sampling)
                first_rows.append(member_rows[0])
            if request.is_lockstep:
                ensembles.append(indices)
        return cls(params, first_rows, ensembles, decision_of_row)


def draws(rows: list[Sequence]) -> torch.Tensor:
    """u ~ U[0, 1) per row [B] on the host (float64; 0 for greedy rows): a seeded request's row's from the row's own
    generator, so that they never depend on the batch (a `mean` ensemble's from its first: its rows decide together
    with the draw of whichever comes first); the other sampled rows' from one draw of torch's."""
    uniforms = array("d", bytes(8 * len(rows)))  # zeros
    unseeded = []
    for i, row in enumerate(rows):
        request = row.request
        if request.generators:
            uniforms[i] = request.generators[0 if request.is_lockstep else row.index].random()
        elif request.sampling.do_sample:
            unseeded.append(i)
    if unseeded:
        for i, u in zip(unseeded, torch.rand(len(unseeded), dtype=torch.float64, device=HOST).tolist(), strict=True):
            uniforms[i] = u
    return from_array(uniforms, torch.float64)


def sample(logits: torch.Tensor, rows: list[Sequence], uniforms: torch.Tensor) -> Sampled:
    """logits [B, V] (float32), the rows' draws [B] (`draws`) -> one token per row. Log-probabilities are the
    model's own (before temperature, top-k and top-p), as vLLM and OpenAI report them; a `mean` ensemble reports the
    members' average."""
    decisions = Decisions.of(rows)
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
    scores = logits
    if decisions.first_rows is not None:
        uniforms = uniforms[decisions.first_rows]
    if decisions.decision_of_row is not None:
        first_rows, decision_of_row, *members = to_device(  # one copy that does not block
            [long_tensor(decisions.first_rows or []), long_tensor(decisions.decision_of_row),
             *map(long_tensor, decisions.ensembles)], logits.device)  # fmt: skip
        scores, logprobs = ensemble_scores(logits, logprobs, decisions, first_rows, members)
    tokens = choose(scores, decisions.params, uniforms)  # [D]
    if decisions.decision_of_row is not None:
        tokens = tokens[decision_of_row]  # [B]
    chosen = logprobs.gather(1, tokens[:, None])  # [B, 1]
    is_finite = logits.amax(dim=-1, keepdim=True).isfinite()  # amax is NaN with any NaN, inf with any inf
    wanted = [row.request.sampling.top_logprobs or 0 for row in rows]
    asking = [i for i, n in enumerate(wanted) if n]  # the rows that ask for top log-probabilities
    k = min(max(wanted, default=0), logprobs.shape[-1])
    packed = torch.cat([tokens[:, None].double(), chosen.double(), is_finite.double()], dim=1)  # [B, 3]
    if k:
        (rows_asking,) = to_device([long_tensor(asking)], logits.device)  # a copy that does not block
        top_values, top_ids = logprobs.index_select(0, rows_asking).topk(k, dim=-1)
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
    logits: torch.Tensor, logprobs: torch.Tensor, decisions: Decisions, first_rows: torch.Tensor,
    members: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The decisions' scores [D, V] (a row's logits; an ensemble's mean log-probabilities) and the rows'
    log-probabilities [B, V], an ensemble's members reporting its mean. `first_rows` and `members` (each ensemble's
    rows): `decisions`' on the device."""
    assert decisions.decision_of_row is not None
    scores = logits.index_select(0, first_rows)
    logprobs = logprobs.clone()
    for rows, index in zip(decisions.ensembles, members, strict=True):
        mean_logprobs = logprobs.index_select(0, index).mean(dim=0)  # [V]
        scores[decisions.decision_of_row[rows[0]]] = mean_logprobs
        logprobs[index] = mean_logprobs
    return scores, logprobs


def choose(scores: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor) -> torch.Tensor:
    """scores [D, V] (logits or log-probabilities), the decisions' draws [D] on the host -> token ids [D]: the
    argmax for greedy rows; for sampled rows the token where the row's u falls in its cumulative distribution after
    temperature, top-k and top-p (summed in float64, so that a token's share of [0, 1) is its probability to 1e-16
    even over a large vocabulary)."""
    tokens = argmax(scores)
    sampled = [i for i, p in enumerate(params) if p.do_sample]
    if not sampled:
        return tokens
    vocab = scores.shape[-1]
    chosen = [params[i] for i in sampled]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in chosen]
    top_p = [p.top_p for p in chosen]
    temperature = [max(p.temperature, MIN_TEMPERATURE) for p in chosen]
    host = double_tensor(chain(sampled, temperature, top_k, top_p)).view(4, len(sampled))
    (on_device,) = to_device([torch.cat([host, uniforms[sampled][None]])], scores.device)  # [5, S], one copy
    width = max((k for k, p in zip(top_k, top_p, strict=True) if k < vocab or p < 1.0), default=0)
    per_chunk = max(1, (HOST_SAMPLE_CHUNK_ELEMENTS if is_host_float(scores) else SAMPLE_CHUNK_ELEMENTS) // vocab)
    chunks = [
        pick(scores, on_device[:, first : first + per_chunk], width) for first in range(0, len(sampled), per_chunk)
    ]
    return tokens.index_copy(0, on_device[0].long(), torch.cat(chunks))


def pick(scores: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    """scores [D, V], some sampled rows' (index, temperature, top-k, top-p, u) [5, S], `width` (0: no row has top-k
    or top-p; else as `lowest_kept`'s) -> their tokens [S]."""
    index, temperatures, ks, ps, u = rows
    filtered = scores.index_select(0, index.long()).div_(temperatures[:, None].to(scores.dtype))  # [S, V]
    below = filtered < lowest_kept(filtered, ks, ps, width) if width else None
    weights = filtered.sub_(filtered.amax(dim=-1, keepdim=True)).exp_()  # [S, V], the best token's 1
    if below is not None:
        weights.masked_fill_(below, 0.0)
    return invert(weights, u[:, None])[:, 0]


def invert(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """weights [S, V] (each row's some positive), u [S, 1] in [0, 1) -> where u falls in each row's cumulative
    distribution [S, 1]. Over a large vocabulary in two steps, so that no float64 running sum runs over [S, V] (on
    the host a scalar loop, and a temporary of the whole): the block of `CDF_BLOCK` tokens u falls in, from the
    blocks' float64 sums, then the token within that block, at u's share of the block. A row of NaN weights (its
    logits not finite) gets some token of the vocabulary, as `locate` gives it one."""
    vocab = weights.shape[-1]
    if vocab <= CDF_BLOCK:
        return locate(weights, u)[0]
    whole = vocab // CDF_BLOCK * CDF_BLOCK
    sums = [weights[:, :whole].unflatten(1, (-1, CDF_BLOCK)).sum(dim=-1, dtype=torch.float64)]  # [S, V // block]
    if whole < vocab:
        sums.append(weights[:, whole:].sum(dim=-1, keepdim=True, dtype=torch.float64))
    block, within = share(torch.cat(sums, dim=1), u)  # [S, 1] each
    first = block * CDF_BLOCK
    columns = first + torch.arange(CDF_BLOCK, device=weights.device)  # [S, CDF_BLOCK]
    in_block = weights.gather(1, columns.clamp(max=vocab - 1)).masked_fill_(columns >= vocab, 0.0)  # the last's
    return (first + locate(in_block, within)[0]).clamp_(max=vocab - 1)  # NaN weights find no token: some token


def locate(weights: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weights [S, N] (each row's some positive), u [S, 1] in [0, 1) -> the index where u's share of each row's total
    falls [S, 1], that point [S, 1] and the cumulative weights [S, N]. Summed in float64, so that an index's share
    of [0, 1) is its share of the total to 1e-16; the point is kept below the total, so an index of no weight is
    never the one."""
    cumulative = weights.cumsum(dim=-1, dtype=torch.float64)  # [S, N]
    total = cumulative[:, -1:]
    point = (u * total).minimum(total * (1 - 2**-52))
    index = torch.searchsorted(cumulative, point, right=True).clamp_(max=weights.shape[-1] - 1)
    return index, point, cumulative


def share(weights: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As `locate`: the index, and how far into its weight the point falls, as a share of it in [0, 1) [S, 1]."""
    index, point, cumulative = locate(weights, u)
    weight = weights.gather(1, index).double()
    return index, ((point - cumulative.gather(1, index) + weight) / weight).clamp_(0.0, 1 - 2**-53)


def lowest_kept(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, width: int) -> torch.Tensor:
    """scores [S, V], top_k [S] (V: none), top_p [S] (1: none), `width`: at least every row's top-k, and V where a
    row has top-p without top-k -> the lowest score each row keeps [S, 1]. Top-k keeps the tokens scoring at least
    the k-th best; top-p then keeps the smallest run of the most likely tokens whose probability reaches top_p
    (always at least one) and every token tied with the last of them, so no order among equal scores (which a sort
    does not fix) decides. One `topk` of `width` for the whole batch, so no sort of the vocabulary where every row
    has a top-k: the tokens tied with the k-th best but ranked beyond `width` are counted, so the mass before each
    ranked token is exact. The masses are summed in float64 (float32 has no digits left for a tail 1e-4 of the
    whole) and the total is the running sum's last, so a row's cut does not move with the batch's `width`."""
    vocab = scores.shape[-1]
    values = descending(scores, width)  # [S, width]
    kth = values.gather(1, (top_k.long().clamp(max=width) - 1)[:, None])  # [S, 1]
    threshold = torch.where(top_k[:, None] < vocab, kth, float("-inf"))
    best = values[:, :1]
    weights = (values - best).exp().masked_fill(values < threshold, 0.0)  # [S, width]
    cumulative = weights.cumsum(dim=-1, dtype=torch.float64)  # [S, width]
    total = cumulative[:, -1:].clone()
    if width < vocab:  # tokens tied with the k-th best may be ranked beyond `width`
        ties = count(scores == threshold) - count(values == threshold)  # [S, 1]
        total += ties * (threshold - best).exp().double()
    mass_before = cumulative.sub_(weights)  # of the tokens scoring higher (ties: any order)
    last = (mass_before < top_p[:, None] * total).sum(dim=-1, keepdim=True).clamp_(min=1) - 1
    return torch.where(top_p[:, None] < 1.0, values.gather(1, last).maximum(threshold), threshold)


def count(mask: torch.Tensor) -> torch.Tensor:
    """mask [S, N] (bool) -> the trues in each row [S, 1], counted as bytes (a bool sum converts to int64 first)."""
    return mask.view(torch.uint8).sum(dim=-1, keepdim=True, dtype=torch.int32)


def argmax(scores: torch.Tensor) -> torch.Tensor:
    """scores [N, V] -> the index of each row's largest [N], the first of equals (NaN the largest), as torch's.
    On the host numpy's, whose loop is vectorised: torch's CPU argmax takes 55 µs over [256, 259] and 4.6 ms over
    [256, 32000], numpy's 6 µs and 1 ms."""
    if not is_host_float(scores):
        return scores.argmax(dim=-1)
    return torch.from_numpy(scores.detach().numpy().argmax(axis=-1))


def descending(scores: torch.Tensor, width: int) -> torch.Tensor:
    """scores [S, V] -> each row's `width` largest, largest first [S, width] (NaN the largest), as torch's `topk`.
    On the host numpy's sorts, which use SIMD sorting networks where torch's CPU `topk` and `sort` run a scalar
    nth-element per row: for 128 rows of V 259 and width 40, 36 µs against `topk`'s 330 (V 32,000: 3.7 against 5.8
    ms; width V, top-p without top-k: 9.5 ms against `sort`'s hundreds)."""
    if not is_host_float(scores):
        return scores.topk(width, dim=-1).values
    vocab = scores.shape[-1]
    values = scores.detach().numpy()
    if width == vocab or vocab <= WHOLE_SORT_MAX_VOCAB:
        ranked = np.sort(values, axis=-1)[:, vocab - width :]
    else:
        ranked = np.partition(values, vocab - width, axis=-1)[:, vocab - width :]
        ranked.sort(axis=-1)
    return torch.from_numpy(ranked[:, ::-1].copy())  # a copy's strides are positive (one element: not so in place)


def is_host_float(scores: torch.Tensor) -> bool:
    return scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64)


def suppress_eos(logits: torch.Tensor, rows: list[Sequence], eos_ids: frozenset[int]) -> torch.Tensor:
    """logits [B, V]: rows short of their `min_tokens` cannot end yet (vLLM's min_tokens), so their
    end-of-sequence tokens are masked out; the other rows' logits are untouched."""
    short = [i for i, row in enumerate(rows) if len(row.output_ids) < row.request.sampling.min_tokens]
    if not short or not eos_ids:
        return logits
    eos = [i for i in sorted(eos_ids) if i < logits.shape[-1]]
    masked = logits.clone()
    short_rows, eos_columns = to_device([long_tensor(short), long_tensor(eos)], logits.device)  # without blocking
    masked[short_rows[:, None], eos_columns[None]] = float("-inf")
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
