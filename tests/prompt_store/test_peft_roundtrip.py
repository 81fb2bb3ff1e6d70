"""The store speaks PEFT both ways: what it holds loads back into PEFT unchanged, and materialises as PEFT would.

Greedy tokens come from PEFT's forward without a cache (not its `generate`), checked against the papers'
definitions and against the bare backbone, so a reference that lost the adapter cannot pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prompt_store.materialize import join_prefix, materialize, split_prefix
from prompt_store.registry import TaskStore
from tests.fixtures import ADAPTER_KINDS, BOS_ID, TinyBackbone
from tests.prompt_store.helpers import fingerprint_of
from tests.reference import by_definition_greedy, peft_greedy, peft_model

INPUT_IDS = [BOS_ID, 72, 105, 33, 32, 119]


def stored_model(backbone: TinyBackbone, adapter_dir: Path) -> PeftModel:
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(backbone.path), adapter_dir).eval()


@pytest.fixture
def store(tiny_backbone: TinyBackbone, tmp_path: Path) -> TaskStore:
    return TaskStore(tmp_path / "store", fingerprint_of(tiny_backbone.path))


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_version_dir_generates_like_original_adapter_and_by_definition_every_kind(
    tiny_backbone: TinyBackbone, store, kind
):
    record, _ = store.register_dir(kind, tiny_backbone.adapters[kind])
    stored = peft_greedy(stored_model(tiny_backbone, store.version_dir(kind, record.version)), INPUT_IDS, 8)
    original = peft_greedy(peft_model(tiny_backbone, kind), INPUT_IDS, 8)
    task = materialize(store.load(kind), store.fingerprint, "cpu", torch.float32)
    by_definition = by_definition_greedy(tiny_backbone, task, INPUT_IDS, 8)
    assert stored == original == by_definition
    # the adapter matters: a reference (or a store) that dropped it would give the bare backbone's tokens
    assert stored != peft_greedy(peft_model(tiny_backbone, None), INPUT_IDS, 8)


@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm"])
def test_materialize_prompt_equals_peft_get_prompt(tiny_backbone: TinyBackbone, store, kind):
    store.register_dir(kind, tiny_backbone.adapters[kind])
    task = materialize(store.load(kind), store.fingerprint, "cpu", torch.float32)
    expected = peft_model(tiny_backbone, kind).get_prompt(batch_size=1)[0]  # [P, hidden]
    assert task.prompt_embeds is not None and task.prompt_embeds.is_contiguous()
    assert torch.equal(task.prompt_embeds, expected)
    assert not task.prefix_keys and not task.prefix_values


@pytest.mark.parametrize("kind", ["prefix", "prefix_projection"])
def test_materialize_prefix_equals_peft_past_key_values(tiny_backbone: TinyBackbone, store, kind):
    store.register_dir(kind, tiny_backbone.adapters[kind])
    task = materialize(store.load(kind), store.fingerprint, "cpu", torch.float32)
    cache = peft_model(tiny_backbone, kind).get_prompt(batch_size=1)
    fp = store.fingerprint
    assert task.prompt_embeds is None and len(task.prefix_keys) == len(task.prefix_values) == fp.num_layers
    for layer in range(fp.num_layers):
        keys, values = task.prefix_keys[layer], task.prefix_values[layer]
        assert keys.shape == values.shape == (fp.num_key_value_heads, task.num_virtual_tokens, fp.head_dim)
        assert keys.is_contiguous() and values.is_contiguous()
        assert torch.equal(keys, cache.layers[layer].keys[0]) and torch.equal(values, cache.layers[layer].values[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_materialize_casts_to_requested_dtype(tiny_llama: TinyBackbone, tmp_path: Path, dtype):
    store = TaskStore(tmp_path, fingerprint_of(tiny_llama.path))
    store.register_dir("prefix", tiny_llama.adapters["prefix"])
    artifact = store.load("prefix")
    task = materialize(artifact, store.fingerprint, "cpu", dtype)
    assert all(t.dtype == dtype for t in [*task.prefix_keys, *task.prefix_values])
    assert task.nbytes == artifact.prompt_embeddings.numel() * torch.finfo(dtype).bits // 8


@pytest.mark.gpu
def test_materialize_places_tensors_on_cuda(tiny_llama: TinyBackbone, tmp_path: Path):
    store = TaskStore(tmp_path, fingerprint_of(tiny_llama.path))
    store.register_dir("prompt", tiny_llama.adapters["prompt_tuning"])
    task = materialize(store.load("prompt"), store.fingerprint, "cuda", torch.bfloat16)
    assert task.prompt_embeds is not None and task.prompt_embeds.device.type == "cuda"


def test_join_prefix_inverts_split_prefix(llama_fp):
    rows = torch.randn((3, llama_fp.num_layers * 2 * llama_fp.kv_dim))
    assert torch.equal(join_prefix(*split_prefix(rows, llama_fp)), rows)
