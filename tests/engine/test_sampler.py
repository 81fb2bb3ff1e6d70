"""Sampling filters and seeded reproducibility, on hand-made logits."""

from __future__ import annotations

import torch

from server.engine import sampler
from server.engine.request import Request, Sequence
from server.engine.sampler import choose, sample, score, suppress_eos, top_k_top_p_filter
from server.engine.types import SamplingParams


def kept(scores: list[float], top_k: int = 0, top_p: float = 1.0) -> list[bool]:
    filtered = top_k_top_p_filter(torch.tensor([scores]), torch.tensor([top_k]), torch.tensor([top_p]))
    return torch.isfinite(filtered[0]).tolist()


def test_top_k_filter_keeps_k_best():
    assert kept([1.0, 4.0, 3.0, 2.0], top_k=2) == [False, True, True, False]


def test_top_k_filter_keeps_ties_with_the_kth_best():
    assert kept([1.0, 4.0, 3.0, 3.0], top_k=2) == [False, True, True, True]


def test_top_k_zero_keeps_everything():
    assert kept([1.0, 4.0, 3.0]) == [True, True, True]


def test_top_p_filter_keeps_smallest_set_reaching_p():
    assert kept(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).tolist(), top_p=0.8) == [True, True, False, False]


def test_top_p_filter_always_keeps_the_best_token():
    assert kept(torch.log(torch.tensor([0.9, 0.1])).tolist(), top_p=0.01) == [True, False]


def test_top_p_applies_after_top_k():
    """Top-p measures the mass of what top-k kept: 0.5 / 0.8 of it is below 0.7, so the second token stays."""
    probs = torch.log(torch.tensor([0.5, 0.3, 0.2])).tolist()
    assert kept(probs, top_k=2, top_p=0.7) == [True, True, False]
    assert kept(probs, top_p=0.5) == [True, False, False]


def test_filters_take_each_rows_own_parameters():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    filtered = top_k_top_p_filter(scores, torch.tensor([1, 0, 0]), torch.tensor([1.0, 0.8, 1.0]))
    assert torch.isfinite(filtered).tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, True],
    ]


def draw(scores: torch.Tensor, params: SamplingParams, seed: int | None = 0) -> int:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return int(choose(scores[None], [params], [generator])[0])


def test_choose_greedy_is_argmax():
    assert draw(torch.tensor([0.1, 2.0, 0.3]), SamplingParams(), None) == 1


def test_choose_with_same_seed_gives_same_draws():
    scores = torch.randn(50)
    params = SamplingParams(do_sample=True, temperature=1.5, top_k=20, top_p=0.9)
    draws = [
        [int(choose(scores[None], [params], [generator])[0]) for _ in range(20)]
        for generator in (torch.Generator().manual_seed(7), torch.Generator().manual_seed(7))
    ]
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1  # it really samples


def test_seeded_row_draws_the_same_alone_and_in_any_batch():
    """A seeded row's draws come from its own generator: batch mates (greedy, unseeded, other seeds, other
    filters) before or after it change nothing."""
    torch.manual_seed(0)
    scores = torch.randn(5, 64)
    seeded = SamplingParams(do_sample=True, temperature=1.2, top_k=30, top_p=0.95, seed=11)
    others = [SamplingParams(), SamplingParams(do_sample=True), SamplingParams(do_sample=True, top_p=0.5, seed=3)]
    alone_generator = torch.Generator().manual_seed(11)
    alone = [int(choose(scores[2:3], [seeded], [alone_generator])[0]) for _ in range(30)]
    generators = [None, None, torch.Generator().manual_seed(11), None, torch.Generator().manual_seed(3)]
    params = [others[0], others[1], seeded, others[1], others[2]]
    in_batch = [int(choose(scores, params, generators)[2]) for _ in range(30)]
    assert in_batch == alone


def test_choose_draws_in_proportion_to_the_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    params = SamplingParams(do_sample=True)
    generator = torch.Generator().manual_seed(0)
    draws = choose(probs.log().expand(4000, 4), [params] * 4000, [generator] + [None] * 3999)
    frequencies = torch.bincount(draws, minlength=4) / 4000
    assert torch.allclose(frequencies, probs, atol=0.03), frequencies


def test_choose_never_draws_a_filtered_token():
    scores = torch.tensor([5.0, 4.0, -1.0, -2.0])
    params = SamplingParams(do_sample=True, top_k=2)
    generator = torch.Generator().manual_seed(0)
    assert {int(choose(scores[None], [params], [generator])[0]) for _ in range(200)} <= {0, 1}


def test_extreme_parameters_still_draw_the_best_token():
    """A temperature or top_p too small for float32 must not turn the probabilities into NaN."""
    scores = torch.tensor([0.5, 2.0, 1.0])
    for params in (
        SamplingParams(do_sample=True, temperature=1e-300),
        SamplingParams(do_sample=True, top_p=1e-300),
        SamplingParams(do_sample=True, temperature=1e-300, top_p=1e-300),
    ):
        assert draw(scores, params) == 1


def sampling_row(sampling: SamplingParams) -> Sequence:
    request = Request("r", [1], sampling, 8, lambda output: None)
    request.rows = [Sequence(request, None)]
    return request.rows[0]


def test_sample_reports_log_probabilities_top_tokens_and_non_finite_rows():
    logits = torch.tensor([[0.0, 2.0, 1.0], [0.0, float("nan"), 1.0], [3.0, 0.0, 1.0]])
    rows = [
        sampling_row(SamplingParams(top_logprobs=2)),
        sampling_row(SamplingParams()),
        sampling_row(SamplingParams()),
    ]
    sampled = sample(logits, rows)
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
