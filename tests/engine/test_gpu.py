"""The same promises on a CUDA device (skipped without one)."""

from __future__ import annotations

import pytest

from tests.engine.harness import Harness, token_ids
from tests.engine.test_exactness import TASKS, TEXTS

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mixed_batch_runs_every_kind_on_cuda(tiny_llama, tmp_path, dtype: str):
    harness = Harness(tiny_llama, tmp_path / "store", device="cuda", dtype=dtype)
    completions = harness.run(*(harness.request(TEXTS[task], task, max_new_tokens=8) for task in TASKS))
    assert all(c.generated_tokens == 8 or c.finish_reason.value != "length" for c in completions)
    assert harness.is_idle()


def test_mixed_batch_tokens_equal_alone_on_cuda_float32(tiny_llama, tmp_path):
    harness = Harness(tiny_llama, tmp_path / "store", device="cuda", dtype="float32")
    alone = [token_ids(harness.alone(TEXTS[task], task, max_new_tokens=10)) for task in TASKS]
    mixed = harness.run(*(harness.request(TEXTS[task], task, max_new_tokens=10) for task in TASKS))
    assert [token_ids(c) for c in mixed] == alone


def test_seeded_sampling_same_alone_and_mixed_on_cuda(tiny_llama, tmp_path):
    harness = Harness(tiny_llama, tmp_path / "store", device="cuda", dtype="float32")
    sampling = {"do_sample": True, "seed": 99, "max_new_tokens": 10, "top_p": 0.9}
    alone = token_ids(harness.alone("gpu", "prefix", **sampling))
    mixed = harness.run(*(harness.request(TEXTS[t], t) for t in TASKS), harness.request("gpu", "prefix", **sampling))
    assert token_ids(mixed[-1]) == alone
