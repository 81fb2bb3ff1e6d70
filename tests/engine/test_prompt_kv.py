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
    (entry,) = harness.cache.entries.values()
    fp = harness.backbone.fingerprint
    assert entry.task.prompt_embeds is None and len(entry.task.prefix_keys) == fp.num_layers
    assert entry.task.prefix_keys[0].shape == (fp.num_key_value_heads, entry.task.num_virtual_tokens, fp.head_dim)
    assert steps[0].num_prefill_tokens == request.num_input_tokens
    assert harness.cache.resident_bytes == entry.task.nbytes


def test_cached_and_recomputed_virtual_tokens_give_the_same_tokens(tiny_backbone: TinyBackbone, tmp_path):
    cached = Harness(tiny_backbone, tmp_path / "a")
    recomputed = Harness(tiny_backbone, tmp_path / "b", cache_prompt_kv=False)
    for task in ("prompt_tuning", "p_tuning_mlp", "p_tuning_lstm"):
        a = cached.alone("zz top, twice", task, max_new_tokens=12)
        b = recomputed.alone("zz top, twice", task, max_new_tokens=12)
        assert token_ids(a) == token_ids(b)
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.tokens, b.tokens, strict=True)) < 1e-4
