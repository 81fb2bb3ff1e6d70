"""Facts about PEFT 0.21.2 prompt-learning classification on transformers 5.24 encoders that issue 13's engine
relies on (see tests/nlu_fixtures.py): saved tensor names and shapes, how each kind reaches the model, the prefix
layout, and that every adapter (prompt and head) changes the probabilities."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from server.engine.reference import cache_kwarg, peft_generate_broken_reason
from tests.nlu_fixtures import (
    HEADS,
    HIDDEN,
    LAYERS,
    NLU_ARCHS,
    NLU_VIRTUAL_TOKENS,
    NUM_LABELS,
    PREFIX_KINDS,
    encoder_tokenizer,
    load_nlu_peft,
    nlu_kinds,
    nlu_reference,
    write_nlu_adapter,
    write_nlu_backbone,
)

TEXTS = ["Hello world", "ok"]


@pytest.fixture(scope="module", params=NLU_ARCHS)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    arch = request.param
    root = tmp_path_factory.mktemp(f"nlu-{arch}")
    out = {"arch": arch}
    for head in ("seq", "token"):
        backbone = write_nlu_backbone(arch, root / head, head=head)
        adapters = {
            kind: write_nlu_adapter(backbone, head, kind, root / f"{head}-{kind}", NLU_VIRTUAL_TOKENS[kind], seed=s)
            for s, kind in enumerate(nlu_kinds(arch))
        }
        out[head] = (backbone, adapters)
    return out


def test_deberta_v2_takes_no_prefix(built: dict) -> None:
    assert set(PREFIX_KINDS).isdisjoint(nlu_kinds("deberta_v2"))
    if built["arch"] != "deberta_v2":
        assert set(PREFIX_KINDS) <= set(nlu_kinds(built["arch"]))


@pytest.mark.parametrize("head", ["seq", "token"])
def test_saved_tensors_and_config(built: dict, head: str) -> None:
    arch = built["arch"]
    _, adapters = built[head]
    if head == "seq" and arch in ("roberta", "electra"):  # a classification head: dense, activation, out_proj
        head_shapes = {
            "base_model.classifier.dense.weight": (HIDDEN, HIDDEN),
            "base_model.classifier.dense.bias": (HIDDEN,),
            "base_model.classifier.out_proj.weight": (NUM_LABELS, HIDDEN),
            "base_model.classifier.out_proj.bias": (NUM_LABELS,),
        }
    else:
        head_shapes = {
            "base_model.classifier.weight": (NUM_LABELS, HIDDEN),
            "base_model.classifier.bias": (NUM_LABELS,),
        }
    for kind, adapter in adapters.items():
        tensors = {name: tuple(t.shape) for name, t in load_file(adapter / "adapter_model.safetensors").items()}
        p = NLU_VIRTUAL_TOKENS[kind]
        width = 2 * LAYERS * HIDDEN if kind in PREFIX_KINDS else HIDDEN  # P-tuning saves its encoder's output
        assert tensors == {"prompt_embeddings": (p, width), **head_shapes}, kind
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["task_type"] == ("SEQ_CLS" if head == "seq" else "TOKEN_CLS")
        assert (config["num_virtual_tokens"], config["num_layers"], config["token_dim"]) == (p, LAYERS, HIDDEN)
        assert config["num_attention_heads"] == HEADS and config["num_transformer_submodules"] == 1
        assert set(config["modules_to_save"]) == {"classifier", "score"}  # duplicated in the file by PEFT
        assert not (adapter / "config.json").exists()  # PEFT saves no id2label anywhere


@pytest.mark.parametrize("head", ["seq", "token"])
def test_every_adapter_matters_and_token_rows_align(built: dict, head: str) -> None:
    backbone, adapters = built[head]
    bare = nlu_reference(backbone, None, TEXTS, head)
    lengths = [len(encoder_tokenizer()(t)["input_ids"]) for t in TEXTS]
    for kind, adapter in adapters.items():
        probs = nlu_reference(backbone, adapter, TEXTS, head)
        for p, b, n in zip(probs, bare, lengths, strict=True):
            assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
            if head == "token":  # prompt kinds: PEFT keeps the P virtual rows first; prefix kinds add none
                assert p.shape == (n + (0 if kind in PREFIX_KINDS else NLU_VIRTUAL_TOKENS[kind]), NUM_LABELS)
                p = p[-n:]
            assert (p - b).abs().max() > 1e-3, kind


def test_peft_prefix_forward_is_broken_and_prefix_layout(built: dict) -> None:
    """PEFT's own prefix forward raises; its `get_prompt` cache equals the saved tensor read as
    view(P, 2L, heads, head_dim) with layer i's key at 2i and value at 2i+1; positions start after the prefix."""
    if built["arch"] == "deberta_v2":
        pytest.skip("no prefix tuning on DeBERTa-v2")
    backbone, adapters = built["token"]
    ids = torch.tensor([encoder_tokenizer()("Hello world")["input_ids"]])
    n = ids.shape[1]
    for kind in PREFIX_KINDS:
        model = load_nlu_peft(backbone, "token", adapters[kind])
        if peft_generate_broken_reason() is not None:  # the cache argument renamed under PEFT's signature check
            with pytest.raises(ValueError, match="does not support past key values"):
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
        p = NLU_VIRTUAL_TOKENS[kind]
        saved = load_file(adapters[kind] / "adapter_model.safetensors")["prompt_embeddings"]
        layout = saved.view(p, 2 * LAYERS, HEADS, HIDDEN // HEADS)
        cache = DynamicCache()
        for layer in range(LAYERS):  # (batch, heads, P, head_dim)
            key = layout[:, 2 * layer].transpose(0, 1).unsqueeze(0)
            value = layout[:, 2 * layer + 1].transpose(0, 1).unsqueeze(0)
            cache.update(key.contiguous(), value.contiguous(), layer)
        mask = torch.ones(1, p + n, dtype=torch.long)
        with torch.no_grad():
            manual = model.base_model(
                input_ids=ids, attention_mask=mask, **{cache_kwarg(model.base_model): cache}
            ).logits
        reference = nlu_reference(backbone, adapters[kind], ["Hello world"], "token")[0]
        torch.testing.assert_close(torch.softmax(manual, -1)[0], reference, rtol=0, atol=1e-6)
        if built["arch"] == "bert":  # absolute positions: P..P+n-1, not 0..n-1
            with torch.no_grad():
                shifted = model.base_model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=torch.arange(p, p + n)[None],
                    **{cache_kwarg(model.base_model): model.get_prompt(1)},
                ).logits
                from_zero = model.base_model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=torch.arange(n)[None],
                    **{cache_kwarg(model.base_model): model.get_prompt(1)},
                ).logits
            torch.testing.assert_close(torch.softmax(shifted, -1)[0], reference, rtol=0, atol=1e-6)
            assert (torch.softmax(from_zero, -1)[0] - reference).abs().max() > 1e-4
