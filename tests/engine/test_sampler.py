"""Sampling filters and seeded reproducibility, on hand-made logits."""

from __future__ import annotations

import torch

from server.engine.request import Request, Sequence
from server.engine.sampler import choose, suppress_eos, top_k_filter, top_p_filter
from server.engine.types import SamplingParams


def test_top_k_filter_keeps_k_best():
    scores = torch.tensor([1.0, 4.0, 3.0, 2.0])
    kept = torch.isfinite(top_k_filter(scores, 2))
    assert kept.tolist() == [False, True, True, False]


def test_top_k_zero_keeps_everything():
    scores = torch.tensor([1.0, 4.0, 3.0])
    assert torch.equal(top_k_filter(scores, 0), scores)


def test_top_p_filter_keeps_smallest_set_reaching_p():
    scores = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(top_p_filter(scores, 0.8))
    assert kept.tolist() == [True, True, False, False]


def test_top_p_filter_always_keeps_the_best_token():
    scores = torch.log(torch.tensor([0.9, 0.1]))
    assert torch.isfinite(top_p_filter(scores, 0.01)).tolist() == [True, False]


def test_choose_greedy_is_argmax():
    assert int(choose(torch.tensor([0.1, 2.0, 0.3]), SamplingParams(), None)) == 1


def test_choose_with_same_seed_gives_same_draws():
    scores = torch.randn(50)
    params = SamplingParams(do_sample=True, temperature=1.5, top_k=20, top_p=0.9)
    draws = [
        [int(choose(scores, params, generator)) for _ in range(20)]
        for generator in (torch.Generator().manual_seed(7), torch.Generator().manual_seed(7))
    ]
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1  # it really samples


def test_choose_never_draws_a_filtered_token():
    scores = torch.tensor([5.0, 4.0, -1.0, -2.0])
    params = SamplingParams(do_sample=True, top_k=2)
    generator = torch.Generator().manual_seed(0)
    assert {int(choose(scores, params, generator)) for _ in range(200)} <= {0, 1}


def test_extreme_parameters_still_draw_the_best_token():
    """A temperature or top_p too small for float32 must not turn the probabilities into NaN."""
    scores = torch.tensor([0.5, 2.0, 1.0])
    generator = torch.Generator().manual_seed(0)
    for params in (
        SamplingParams(do_sample=True, temperature=1e-300),
        SamplingParams(do_sample=True, top_p=1e-300),
        SamplingParams(do_sample=True, temperature=1e-300, top_p=1e-300),
    ):
        assert int(choose(scores, params, generator)) == 1


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
