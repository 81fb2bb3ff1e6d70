"""PEFT SEQ_2_SEQ_LM adapters in the store (issue 12): accepted for an encoder-decoder backbone, refused with both
kinds named across kinds, and materialised as PEFT's own forward uses them (its get_prompt, compared tensor for
tensor): the encoder prompt's first P rows, and the decoder self-attention prefix per layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from prompt_store.adapter import StoreLimits, parse_adapter
from prompt_store.errors import InvalidTask
from prompt_store.materialize import materialize
from prompt_store.types import BackboneFingerprint, Method, TaskArtifact, TaskRecord
from server.engine.backbone import fingerprint_of
from tests.fixtures import TinyBackbone
from tests.seq2seq_fixtures import SEQ2SEQ_ADAPTER_KINDS, SEQ2SEQ_ARCHS, build_tiny_seq2seq_backbone, load_seq2seq_peft


@pytest.fixture(scope="module", params=SEQ2SEQ_ARCHS)
def seq2seq(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyBackbone:
    return build_tiny_seq2seq_backbone(request.param, tmp_path_factory.mktemp(f"s2s-store-{request.param}"))


def fingerprint(backbone: TinyBackbone) -> BackboneFingerprint:
    return fingerprint_of(AutoModelForSeq2SeqLM.from_pretrained(backbone.path))


def parse(adapter: Path, fp: BackboneFingerprint) -> tuple[dict, torch.Tensor, Method]:
    config = (adapter / "adapter_config.json").read_bytes()
    content = parse_adapter(config, (adapter / "adapter_model.safetensors").read_bytes(), fp, StoreLimits())
    return content.config, content.prompt, content.method


def artifact(adapter: Path, fp: BackboneFingerprint) -> TaskArtifact:
    config, tensor, method = parse(adapter, fp)
    record = TaskRecord("t", 1, method, config["num_virtual_tokens"], 0, "", "2026-11-30T00:00:00Z")
    return TaskArtifact(record=record, config=config, prompt_embeddings=tensor)


def test_the_fingerprint_says_encoder_decoder(seq2seq: TinyBackbone):
    fp = fingerprint(seq2seq)
    assert fp.is_encoder_decoder and fp.num_decoder_layers == 2 and fp.task_type == "SEQ_2_SEQ_LM"


@pytest.mark.parametrize("kind", SEQ2SEQ_ADAPTER_KINDS)
def test_every_kind_is_accepted(seq2seq: TinyBackbone, kind: str):
    config, tensor, method = parse(seq2seq.adapters[kind], fingerprint(seq2seq))
    assert method.is_prefix == kind.startswith("prefix")
    rows = config["num_virtual_tokens"] * (1 if method.is_prefix else 2)  # an encoder and a decoder prompt
    assert tensor.shape[0] == rows


def test_a_causal_adapter_on_an_encoder_decoder_names_both_kinds(seq2seq: TinyBackbone, tiny_llama: TinyBackbone):
    with pytest.raises(InvalidTask, match=r"task_type must be 'SEQ_2_SEQ_LM' \(an encoder-decoder .*found 'CAUSAL_LM'"):
        parse(tiny_llama.adapters["prompt_tuning"], fingerprint(seq2seq))


def test_an_encoder_decoder_adapter_on_a_causal_backbone_names_both_kinds(seq2seq: TinyBackbone, tiny_llama):
    causal = fingerprint_of(AutoModelForCausalLM.from_pretrained(tiny_llama.path))
    with pytest.raises(InvalidTask, match=r"task_type must be 'CAUSAL_LM' \(a causal .*found 'SEQ_2_SEQ_LM'"):
        parse(seq2seq.adapters["prompt_tuning"], causal)


@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning_mlp"])
def test_a_prompt_is_the_encoders_first_p_rows_as_peft_uses_them(seq2seq: TinyBackbone, kind: str):
    adapter = seq2seq.adapters[kind]
    task = materialize(artifact(adapter, fingerprint(seq2seq)), fingerprint(seq2seq), "cpu", torch.float32)
    model = load_seq2seq_peft(seq2seq.path, adapter)
    num_virtual = task.num_virtual_tokens
    with torch.no_grad():
        expected = model.get_prompt(batch_size=1)[0, :num_virtual]
    assert task.prompt_embeds is not None
    torch.testing.assert_close(task.prompt_embeds, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["prefix", "prefix_projection"])
def test_a_prefix_is_what_peft_puts_in_each_decoder_layers_self_attention(seq2seq: TinyBackbone, kind: str):
    adapter = seq2seq.adapters[kind]
    task = materialize(artifact(adapter, fingerprint(seq2seq)), fingerprint(seq2seq), "cpu", torch.float32)
    model = load_seq2seq_peft(seq2seq.path, adapter)
    with torch.no_grad():
        cache = model.get_prompt(batch_size=1).self_attention_cache
    assert len(task.prefix_keys) == len(cache.layers) == 2
    for layer, (keys, values) in enumerate(zip(task.prefix_keys, task.prefix_values, strict=True)):
        torch.testing.assert_close(keys, cache.layers[layer].keys[0], rtol=0, atol=0)
        torch.testing.assert_close(values, cache.layers[layer].values[0], rtol=0, atol=0)


def test_a_prefix_for_a_decoder_deeper_than_its_encoder_is_refused(seq2seq: TinyBackbone):
    fp = fingerprint(seq2seq)
    deeper = BackboneFingerprint(**{**{f: getattr(fp, f) for f in fp.__slots__}, "num_decoder_layers": 3})
    with pytest.raises(InvalidTask, match="PEFT itself cannot run"):
        parse(seq2seq.adapters["prefix"], deeper)
    parse(seq2seq.adapters["prompt_tuning"], deeper)  # prompts go to the encoder: fine
