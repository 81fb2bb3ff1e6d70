"""bfloat16 on the CPU: a row's greedy answer is the same alone and in a mixed batch, except where the batch's
different rounding flips a near-tie (the two runs' log-probabilities of their tokens within the self-check's
bfloat16 tolerance at the first difference; after it the rows see different inputs)."""

from __future__ import annotations

from pathlib import Path

import torch

from server.engine.selfcheck import tolerance_of
from tests.engine.harness import Harness, token_ids
from tests.engine.test_exactness import TASKS, TEXTS
from tests.fixtures import TinyBackbone


def test_bfloat16_greedy_answers_are_batch_invariant_except_at_near_ties(tiny_llama: TinyBackbone, tmp_path: Path):
    harness = Harness(tiny_llama, tmp_path / "store", dtype="bfloat16")
    alone = {task: harness.alone(TEXTS[task], task, max_new_tokens=12) for task in TASKS}
    mixed = harness.run(*(harness.request(TEXTS[task], task, max_new_tokens=12) for task in TASKS))
    tolerance = tolerance_of(torch.bfloat16)
    flips = []
    for task, completion in zip(TASKS, mixed, strict=True):
        one, batched = token_ids(alone[task]), token_ids(completion)
        if one == batched:
            continue
        first = next(i for i, (a, b) in enumerate(zip(one, batched, strict=False)) if a != b)
        gap = abs(alone[task].tokens[first].logprob - completion.tokens[first].logprob)
        flips.append((task, first, gap))
        assert gap <= tolerance, f"task {task}: token {first + 1} differs by {gap:.4f} nats, not a near-tie"
    assert len(flips) < len(TASKS), f"every row flipped: {flips}"
    assert harness.is_idle()
