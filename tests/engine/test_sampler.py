"""Sampling filters and seeded reproducibility, on hand-made logits."""

from __future__ import annotations

import torch

from server.engine import sampler
from server.engine.intake import make_generators
from server.engine.request import Request, Sequence
from server.engine.sampler import choose, draws, lowest_kept, sample, score, suppress_eos
from server.engine.types import EnsembleMode, SamplingParams


def kept(scores: list[float], top_k: int = 0, top_p: float = 1.0, width: int | None = None) -> list[bool]:
    vocab = len(scores)
    k = top_k if 0 < top_k < vocab else vocab
    row = torch.tensor([scores])
    return (row >= lowest_kept(row, torch.tensor([k]), torch.tensor([top_p]), width or vocab))[0].tolist()


def test_top_k_filter_keeps_k_best():
    assert kept([1.0, 4.0, 3.0, 2.0], top_k=2) == [False, True, True, False]


def test_top_k_filter_keeps_ties_with_the_kth_best():
    assert kept([1.0, 4.0, 3.0, 3.0], top_k=2) == [False, True, True, True]
    assert kept([1.0, 4.0, 3.0, 3.0], top_k=2, width=2) == [False, True, True, True]  # the tie ranked beyond


def test_top_k_zero_keeps_everything():
    assert kept([1.0, 4.0, 3.0]) == [True, True, True]


def test_top_p_filter_keeps_smallest_set_reaching_p():
    assert kept(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).tolist(), top_p=0.8) == [True, True, False, False]


def test_top_p_filter_keeps_every_token_tied_with_the_last_kept():
    """0.4 alone is short of 0.5, so a second token is needed: the two tied at 0.2 stay or go together, whatever
    order a sort would put them in."""
    probs = torch.log(torch.tensor([0.2, 0.4, 0.2, 0.1, 0.1])).tolist()
    assert kept(probs, top_p=0.5) == [True, True, True, False, False]
    assert kept(probs, top_k=2, top_p=0.9, width=2) == [True, True, True, False, False]


def test_top_p_filter_always_keeps_the_best_token():
    assert kept(torch.log(torch.tensor([0.9, 0.1])).tolist(), top_p=0.01) == [True, False]


def test_top_p_applies_after_top_k():
    """Top-p measures the mass of what top-k kept: 0.5 / 0.8 of it is below 0.7, so the second token stays."""
    probs = torch.log(torch.tensor([0.5, 0.3, 0.2])).tolist()
    assert kept(probs, top_k=2, top_p=0.7) == [True, True, False]
    assert kept(probs, top_k=2, top_p=0.7, width=2) == [True, True, False]
    assert kept(probs, top_p=0.45) == [True, False, False]


def test_filters_take_each_rows_own_parameters():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    lowest = lowest_kept(scores, torch.tensor([1, 4, 4]), torch.tensor([1.0, 0.8, 1.0]), 4)
    assert (scores >= lowest).tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, True],
    ]


def test_ranking_only_the_top_k_filters_as_ranking_everything():
    """Rows whose filters all have a top-k rank only the widest k: the same tokens stay as with the whole vocabulary
    ranked, ties at the cut included (scores rounded to make them common)."""
    generator = torch.Generator().manual_seed(5)
    scores = (torch.randn(64, 50, generator=generator) * 2).round() / 2
    top_k = torch.randint(1, 12, (64,), generator=generator)
    top_p = torch.rand(64, generator=generator).where(torch.rand(64, generator=generator) < 0.7, 1.0)
    narrow = lowest_kept(scores, top_k, top_p, int(top_k.max()))
    assert torch.equal(narrow, lowest_kept(scores, top_k, top_p, 50))
    assert (scores >= narrow).sum() > (scores >= narrow).any(dim=-1).sum() + 64  # not one token a row


def test_host_ranking_and_argmax_equal_torchs():
    """On the host `descending` and `argmax` go through numpy (its sorts and argmax are vectorised, torch's CPU
    `topk` and argmax are not): the same values and indices as torch's, with ties, signed zeros, infinities and NaN
    (the largest, as torch ranks it), over a vocabulary numpy sorts whole and one it partitions first."""
    generator = torch.Generator().manual_seed(3)
    for vocab in (9, sampler.WHOLE_SORT_MAX_VOCAB + 88):
        scores = (torch.randn(24, vocab, generator=generator) * 2).round() / 2
        scores[1, :3] = torch.tensor([float("nan"), float("inf"), float("nan")])
        scores[2] = float("-inf")
        scores[3, ::2] = -0.0
        scores[4, -1] = float("inf")
        for dtype in (torch.float32, torch.float64):
            rows = scores.to(dtype)
            assert torch.equal(sampler.argmax(rows), rows.argmax(dim=-1))
            for width in (1, 4, vocab // 3, vocab):
                expected = rows.topk(width, dim=-1).values
                assert torch.allclose(sampler.descending(rows, width), expected, rtol=0, atol=0, equal_nan=True)


def test_a_lone_sampled_row_with_top_k_1_draws_its_best_token(monkeypatch):
    """A ranking of one row and one token reversed by numpy keeps its negative stride (an array of one element
    counts as contiguous whatever its strides), which torch refuses: a lone sampled row with top_k 1 raised, and so
    did a batch of such rows whose last chunk held one (chunks of 4 rows here, 17 rows)."""
    scores = torch.randn(17, 600, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(do_sample=True, top_k=1)
    assert draw(scores[0], params, 0.7) == int(scores[0].argmax())
    monkeypatch.setattr(sampler, "HOST_SAMPLE_CHUNK_ELEMENTS", 4 * 600)
    assert torch.equal(choose(scores, [params] * 17, uniform_draws(17, seed=3)), scores.argmax(dim=-1))


def uniform_draws(count: int, seed: int | None) -> torch.Tensor:
    return torch.rand(count, dtype=torch.float64, generator=torch.Generator().manual_seed(seed or 0))


def draw(scores: torch.Tensor, params: SamplingParams, u: float = 0.5) -> int:
    return int(choose(scores[None], [params], torch.tensor([u], dtype=torch.float64))[0])


def test_choose_greedy_is_argmax():
    assert draw(torch.tensor([0.1, 2.0, 0.3]), SamplingParams()) == 1


def test_choose_picks_where_the_draw_falls_in_the_cumulative_distribution():
    """Probabilities 0.5, 0.3, 0.15, 0.05 split [0, 1) at 0.5, 0.8 and 0.95; a token of probability 0 is never
    picked, not even by a draw at the very top of [0, 1)."""
    scores = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]))
    params = SamplingParams(do_sample=True)
    picks = [draw(scores, params, u) for u in (0.0, 0.49, 0.51, 0.79, 0.81, 0.94, 0.96, 1 - 2**-53)]
    assert picks == [0, 0, 1, 1, 2, 2, 3, 3]


def test_two_step_inversion_picks_where_the_draw_falls_in_the_cumulative_distribution(monkeypatch):
    """Over a vocabulary of several blocks the draw finds its block, then its token in the block: the token the
    cumulative distribution of the whole row gives, a block of no weight and tokens of no weight at a block's ends
    or in the last, partial block never picked (blocks of 3 here, so that 10 tokens make 4)."""
    monkeypatch.setattr(sampler, "CDF_BLOCK", 3)
    probs = torch.tensor([0.5, 0.3, 0.0, 0.0, 0.0, 0.0, 0.15, 0.05, 0.0, 0.0])
    params = SamplingParams(do_sample=True)
    picks = [draw(probs.log(), params, u) for u in (0.0, 0.49, 0.51, 0.79, 0.81, 0.94, 0.96, 1 - 2**-53)]
    assert picks == [0, 0, 1, 1, 6, 6, 7, 7]
    generator = torch.Generator().manual_seed(2)
    weights = torch.rand(400, 10, generator=generator).where(torch.rand(400, 10, generator=generator) < 0.6, 0.0)
    weights[:, 0] += 1e-3  # each row's some positive
    u = uniform_draws(400, seed=4)[:, None]
    cumulative = weights.cumsum(dim=-1, dtype=torch.float64)
    point = u * cumulative[:, -1:]
    expected = torch.searchsorted(cumulative, point, right=True)
    clear = ((cumulative - point).abs() > 1e-9).all(dim=-1)  # no boundary within rounding of the draw
    assert torch.equal(sampler.invert(weights, u)[clear], expected[clear])
    assert clear.sum() > 390
    assert bool((weights.gather(1, sampler.invert(weights, u)) > 0).all())


def test_sampling_a_few_rows_at_a_time_picks_as_all_at_once(monkeypatch):
    """Sampled rows are filtered and drawn a few at a time (so that no temporary grows with the batch times the
    vocabulary): the same tokens as all at once, for every kind of row in the batch."""
    generator = torch.Generator().manual_seed(6)
    scores = torch.randn(23, 40, generator=generator) * 3
    kinds = [SamplingParams(), SamplingParams(do_sample=True, temperature=0.7)] + [
        SamplingParams(do_sample=True, top_k=k, top_p=p) for k, p in ((5, 1.0), (0, 0.8), (12, 0.9))
    ]
    params = [kinds[i % len(kinds)] for i in range(23)]
    u = uniform_draws(23, seed=8)
    at_once = choose(scores, params, u)
    monkeypatch.setattr(sampler, "HOST_SAMPLE_CHUNK_ELEMENTS", 3 * 40)
    assert torch.equal(choose(scores, params, u), at_once)
    assert len(set(at_once.tolist())) > 10


def test_seeded_requests_draw_the_same_alone_and_in_any_batch():
    """A seeded request's draws come from its own generator: batch mates (greedy, unseeded, other seeds) before or
    after it change nothing, nor does another request failing in the same step."""
    alone = sampling_row(SamplingParams(do_sample=True, seed=11))
    alone_draws = [float(draws([alone])[0]) for _ in range(5)]
    mates = [SamplingParams(), SamplingParams(do_sample=True), SamplingParams(do_sample=True, seed=3)]
    seeded = sampling_row(SamplingParams(do_sample=True, seed=11))
    batch = [sampling_row(mates[0]), sampling_row(mates[1]), seeded, sampling_row(mates[1]), sampling_row(mates[2])]
    in_batch = [draws(batch) for _ in range(5)]
    assert [float(d[2]) for d in in_batch] == alone_draws
    assert all(float(d[0]) == 0.0 for d in in_batch)  # greedy rows draw nothing
    assert len({float(d[1]) for d in in_batch}) == 5  # unseeded rows draw afresh


def test_seeded_row_draws_the_same_tokens_alone_and_in_any_batch():
    torch.manual_seed(0)
    scores = torch.randn(5, 64)
    seeded = SamplingParams(do_sample=True, temperature=1.2, top_k=30, top_p=0.95, seed=11)
    others = [SamplingParams(), SamplingParams(do_sample=True), SamplingParams(do_sample=True, top_p=0.5, seed=3)]
    u = uniform_draws(30, seed=11)
    alone = [int(choose(scores[2:3], [seeded], u[i : i + 1])[0]) for i in range(30)]
    params = [others[0], others[1], seeded, others[1], others[2]]
    in_batch = [int(choose(scores, params, torch.rand(5, dtype=torch.float64).index_fill(0, torch.tensor(2), u[i]))[2])
                for i in range(30)]  # fmt: skip
    assert in_batch == alone
    assert len(set(alone)) > 1  # it really samples


def test_choose_draws_in_proportion_to_the_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    params = SamplingParams(do_sample=True)
    picks = choose(probs.log().expand(4000, 4), [params] * 4000, uniform_draws(4000, seed=0))
    frequencies = torch.bincount(picks, minlength=4) / 4000
    assert torch.allclose(frequencies, probs, atol=0.03), frequencies


def test_choose_draws_in_proportion_after_temperature_top_k_and_top_p():
    """Temperature 0.5 squares the probabilities (0.4, 0.3, 0.2, 0.1 -> 16:9:4:1 of 30); top-k 3 drops the last;
    top-p 0.95 of the 29 left keeps all three (16 + 9 = 25 is short of 27.55)."""
    probs = torch.tensor([0.3, 0.4, 0.1, 0.2])
    params = SamplingParams(do_sample=True, temperature=0.5, top_k=3, top_p=0.95)
    picks = choose(probs.log().expand(20000, 4), [params] * 20000, uniform_draws(20000, seed=1))
    frequencies = torch.bincount(picks, minlength=4) / 20000
    assert torch.allclose(frequencies, torch.tensor([9.0, 16.0, 0.0, 4.0]) / 29, atol=0.015), frequencies


def test_choose_never_draws_a_filtered_token():
    scores = torch.tensor([5.0, 4.0, -1.0, -2.0])
    params = SamplingParams(do_sample=True, top_k=2)
    picks = choose(scores.expand(200, 4), [params] * 200, uniform_draws(200, seed=0))
    assert set(picks.tolist()) <= {0, 1}


def test_extreme_parameters_still_draw_the_best_token():
    """A temperature or top_p too small for float32 must not turn the probabilities into NaN."""
    scores = torch.tensor([0.5, 2.0, 1.0])
    for params in (
        SamplingParams(do_sample=True, temperature=1e-300),
        SamplingParams(do_sample=True, top_p=1e-300),
        SamplingParams(do_sample=True, temperature=1e-300, top_p=1e-300),
    ):
        assert draw(scores, params, 0.99) == 1


def sampling_row(sampling: SamplingParams) -> Sequence:
    request = Request("r", [1], sampling, 8, lambda output: None, generators=make_generators(sampling, 1))
    request.rows = [Sequence(request, None)]
    return request.rows[0]


def mean_ensemble_rows(sampling: SamplingParams, num_rows: int) -> list[Sequence]:
    generators = make_generators(sampling, num_rows)
    request = Request("r", [1], sampling, 8, lambda output: None, EnsembleMode.MEAN, generators=generators)
    request.rows = [Sequence(request, None, i) for i in range(num_rows)]
    return request.rows


def test_mean_ensemble_token_does_not_depend_on_the_order_its_rows_reach_the_sampler():
    """Its members decide together with one draw a step: whichever row comes first, the draw is the same."""
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).expand(3, 64)  # equal members
    sampling = SamplingParams(do_sample=True, temperature=2.0, seed=5)
    orders = ([0, 1, 2], [2, 0, 1], [1, 2, 0])
    tokens = []
    for order in orders:
        rows = mean_ensemble_rows(sampling, 3)
        batch = [rows[i] for i in order]
        tokens.append([sample(logits, batch, draws(batch)).token_ids[0] for _ in range(20)])
    assert tokens[1] == tokens[0] and tokens[2] == tokens[0]
    assert len(set(tokens[0])) > 1  # it really samples


def test_rows_of_non_finite_logits_get_a_token_within_the_vocabulary():
    """A row with a NaN or an infinity has NaN weights: over several blocks its draw found no token and took the
    last of its last block, beyond a vocabulary that ends within it (3,071 of 3,000), and gathering its
    log-probability raised for the whole batch (on a GPU: a device-side assert, which ends the process). Its token
    must be some token of the vocabulary, so that the engine fails that request alone, by `is_finite`."""
    for vocab in (3000, 2048):
        logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
        logits[1, 7] = float("nan")
        logits[2, 9] = float("inf")
        logits[3] = float("-inf")
        rows = [sampling_row(SamplingParams(do_sample=True, top_p=p, seed=i)) for i, p in enumerate((1.0, 0.9) * 2)]
        sampled = sample(logits, rows, draws(rows))
        assert all(0 <= token < vocab for token in sampled.token_ids), sampled.token_ids
        assert sampled.is_finite == [True, False, False, False]
        alone = [sampling_row(SamplingParams(do_sample=True, seed=0))]
        assert sampled.token_ids[0] == sample(logits[:1], alone, draws(alone)).token_ids[0]


def test_sample_reports_log_probabilities_top_tokens_and_non_finite_rows():
    logits = torch.tensor([[0.0, 2.0, 1.0], [0.0, float("nan"), 1.0], [3.0, 0.0, 1.0]])
    rows = [
        sampling_row(SamplingParams(top_logprobs=2)),
        sampling_row(SamplingParams()),
        sampling_row(SamplingParams()),
    ]
    sampled = sample(logits, rows, draws(rows))
    logprobs = torch.log_softmax(logits, dim=-1)
    assert sampled.token_ids[0] == 1 and sampled.token_ids[2] == 0
    assert sampled.logprobs[0] == float(logprobs[0, 1]) and sampled.logprobs[2] == float(logprobs[2, 0])
    assert sampled.top[0] == ((1, float(logprobs[0, 1])), (2, float(logprobs[0, 2])))
    assert sampled.top[1:] == [(), ()]
    assert sampled.is_finite == [True, False, True]


def min_tokens_row(min_tokens: int, num_output: int) -> Sequence:
    request = Request("r", [1], SamplingParams(max_new_tokens=8, min_tokens=min_tokens), 8, lambda output: None)
    row = Sequence(request, None)
    row.output_ids = [5] * num_output
    request.rows = [row]
    return row


def test_suppress_eos_masks_only_rows_short_of_min_tokens():
    logits = torch.tensor([[0.0, 9.0, 1.0], [0.0, 9.0, 1.0]])  # token 1 is the end of sequence and the argmax
    rows = [min_tokens_row(3, 2), min_tokens_row(3, 3)]
    masked = suppress_eos(logits, rows, frozenset({1}))
    assert masked.argmax(dim=-1).tolist() == [2, 1]
    assert torch.equal(logits[:, 1], torch.tensor([9.0, 9.0]))  # the caller's logits are not changed


def test_suppress_eos_leaves_logits_alone_without_min_tokens():
    logits = torch.tensor([[0.0, 9.0, 1.0]])
    assert suppress_eos(logits, [min_tokens_row(0, 0)], frozenset({1})) is logits


def scoring_rows(top_logprobs: list[int | None]) -> list[Sequence]:
    def row(k: int | None) -> Sequence:
        request = Request("r", [1], SamplingParams(top_logprobs=k), 1, lambda _: None)
        return Sequence(request, None)

    return [row(k) for k in top_logprobs]


def test_scores_computed_a_few_positions_at_a_time_equal_the_whole(monkeypatch):
    """Each scored position's log-probability, rank and top tokens, against log_softmax and a sort of its row."""
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(3))
    targets = [3, 0, 49, 7, 7, 12, 30]
    rows = scoring_rows([2, None, 5, 1, None, 3, 2])
    monkeypatch.setattr(sampler, "SCORE_CHUNK_ELEMENTS", 2 * 50)
    chunked = score(logits, targets, rows)
    monkeypatch.setattr(sampler, "SCORE_CHUNK_ELEMENTS", 1 << 24)
    assert chunked == score(logits, targets, rows)
    logprobs = torch.log_softmax(logits, dim=-1)
    for i, (logprob, (rank, top)) in enumerate(chunked):
        assert logprob == logprobs[i, targets[i]].item()
        order = logprobs[i].argsort(descending=True).tolist()
        assert rank == order.index(targets[i]) + 1
        assert [token for token, _ in top] == order[: rows[i].request.sampling.top_logprobs or 0]


def reference_kept(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """docs/api.md's rule in float64 one row at a time, by a stable sort (a third party to `lowest_kept`): the tokens
    scoring at least the k-th best, then the smallest run of the most likely whose probability reaches top_p, with
    every token tied with the last of them."""
    scores = scores.double()
    ranked = scores.sort(descending=True, stable=True).values
    kept = scores >= ranked[top_k - 1] if 0 < top_k < len(scores) else torch.ones_like(scores, dtype=torch.bool)
    probs = torch.softmax(scores.masked_fill(~kept, float("-inf")), dim=-1).sort(descending=True, stable=True)
    reached = int((probs.values.cumsum(dim=-1) >= top_p).nonzero()[0]) if top_p < 1.0 else int(kept.sum()) - 1
    return kept & (scores >= scores[probs.indices[min(reached, int(kept.sum()) - 1)]])


def test_filters_keep_what_the_documented_rule_keeps_computed_in_float64():
    """Random rows, ties made common by rounding (to halves, to bfloat16), top-p close to 1 where float32 mass runs
    out of digits (a token's share of 1e-4 of the tail is 1e-8 of the whole)."""
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(96, 4096, generator=generator) * 3
    scores = torch.cat([scores[:32], (scores[32:64] * 2).round() / 2, scores[64:].bfloat16().float()])
    top_k = torch.tensor([0, 7, 300, 4096] * 24)
    top_p = torch.tensor([0.9999, 0.99999, 0.5, 0.999999, 1.0, 0.95] * 16, dtype=torch.float64)
    ks = torch.where(top_k == 0, 4096, top_k)
    kept = scores >= lowest_kept(scores, ks, top_p, 4096)
    expected = torch.stack([reference_kept(s, int(k), float(p)) for s, k, p in zip(scores, top_k, top_p, strict=True)])
    assert torch.equal(kept, expected), (kept != expected).any(dim=-1).nonzero()[:, 0].tolist()


def test_top_p_cut_of_a_top_k_row_does_not_depend_on_the_widest_k_of_its_batch():
    """A batch mate with a larger top-k (or top-p alone) widens the ranking; the row's cut must stay where it is
    alone, even for a top_p at the very mass some prefix of its tokens sums to (in float32 or float64)."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        row = torch.randn(1, 4096, generator=generator) * 2
        k = int(torch.randint(20, 200, (1,), generator=generator))
        weights = (row.topk(k).values - row.max()).exp()  # [1, k]
        prefixes = [weights.cumsum(dim=-1) / weights.sum(), weights.double().cumsum(dim=-1) / weights.double().sum()]
        top_p = torch.cat([prefix[0].double() for prefix in prefixes])  # [2k]
        scores = row.expand(len(top_p), -1)
        ks = torch.full((len(top_p),), k)
        alone, widened = lowest_kept(scores, ks, top_p, k), lowest_kept(scores, ks, top_p, 4096)
        assert torch.equal(alone, widened), f"{int((alone != widened).sum())} of {len(top_p)} cuts move"
