"""Prompt rows reuse the keys and values of their virtual tokens, computed once per task version."""

from __future__ import annotations

from server.engine.types import StepStats
from tests.engine.harness import Harness, token_ids
from tests.fixtures import TinyBackbone


def test_prompt_task_is_cached_as_keys_and_values_and_prefill_skips_its_virtual_tokens(
    tiny_llama: TinyBackbone, tmp_path
):
    harness = Harness(tiny_llama, tmp_path / "store")
    steps: list[StepStats] = []
    harness.engine.step_listeners.append(steps.append)
    request = harness.request("hello world", "prompt_tuning", max_new_tokens=3)
    harness.run(request)
    (task,) = harness.engine.memory.tasks.values()
    assert task.is_filled and task.num_tokens == request.rows[0].num_virtual_tokens and task.ref_count == 0
    assert len(task.block_ids) == harness.engine.memory.blocks_for(task.num_tokens)
    assert steps[0].num_prefill_tokens == request.num_input_tokens
    assert not harness.engine.tasks.embeddings


def test_cached_and_recomputed_virtual_tokens_give_the_same_tokens(tiny_backbone: TinyBackbone, tmp_path):
    cached = Harness(tiny_backbone, tmp_path / "a")
    recomputed = Harness(tiny_backbone, tmp_path / "b", cache_prompt_kv=False)
    for task in ("prompt_tuning", "p_tuning_mlp", "p_tuning_lstm"):
        a = cached.alone("zz top, twice", task, max_new_tokens=12)
        b = recomputed.alone("zz top, twice", task, max_new_tokens=12)
        assert token_ids(a) == token_ids(b)
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.tokens, b.tokens, strict=True)) < 1e-4
