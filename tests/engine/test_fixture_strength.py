"""Every test backbone is strong enough to show a wrong position: one token's position off by one moves some logit
by at least 0.1 (models with relative positions: their position bias removed does). Gentle weights once hid a
wrong BART for a whole wave; the exactness tests are only as good as the models they run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, DistilBertConfig

from tests.fixtures import TinyBackbone, load_causal
from tests.nlu_fixtures import NLU_ARCHS, head_class, write_nlu_backbone
from tests.seq2seq_fixtures import SEQ2SEQ_ARCHS, T5_STYLE, write_seq2seq_backbone

MIN_MOVE = 0.1
INPUT_IDS = torch.tensor([list(b"a wrong position shows")])


def shifted_positions(length: int) -> torch.Tensor:
    positions = torch.arange(length)[None]
    positions[0, -1] += 1  # the last token one position too far
    return positions


def moved(right: torch.Tensor, wrong: torch.Tensor) -> float:
    return float((right - wrong).abs().max())


@torch.inference_mode()
def test_a_causal_fixture_sees_a_wrong_position(tiny_backbone: TinyBackbone):
    model = load_causal(tiny_backbone.path)
    right = model(input_ids=INPUT_IDS).logits[0, -1]
    wrong = model(input_ids=INPUT_IDS, position_ids=shifted_positions(INPUT_IDS.shape[1])).logits[0, -1]
    assert moved(right, wrong) >= MIN_MOVE


@torch.inference_mode()
@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHS)
def test_a_seq2seq_fixture_sees_a_wrong_decoder_position(arch: str, tmp_path: Path):
    model = AutoModelForSeq2SeqLM.from_pretrained(write_seq2seq_backbone(arch, tmp_path / arch)).eval()
    decoder_ids = torch.tensor([[model.config.decoder_start_token_id, *list(b"abcdef")]])
    right = model(input_ids=INPUT_IDS, decoder_input_ids=decoder_ids).logits[0, -1]
    decoder = model.get_decoder()
    if arch in T5_STYLE:  # relative positions: the decoder's bias table is where positions enter
        table = decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        table.zero_()
    else:  # learned positions: the last decoder token's embedding one position on

        def last_one_on(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(output.shape[-2])
            positions[-1] += 1
            return torch.nn.functional.embedding(positions + module.offset, module.weight).expand_as(output)

        decoder.embed_positions.register_forward_hook(last_one_on)
    wrong = model(input_ids=INPUT_IDS, decoder_input_ids=decoder_ids).logits[0, -1]
    assert moved(right, wrong) >= MIN_MOVE


@torch.inference_mode()
@pytest.mark.parametrize("arch", NLU_ARCHS)
def test_an_encoder_fixture_sees_a_wrong_position(arch: str, tmp_path: Path):
    model = head_class("token").from_pretrained(write_nlu_backbone(arch, tmp_path / arch, head="token")).eval()
    right = model(input_ids=INPUT_IDS).logits[0]
    if arch == "deberta_v2":  # relative positions only (as DeBERTa-v3): remove them
        model.base_model.encoder.rel_embeddings.weight.zero_()
        wrong = model(input_ids=INPUT_IDS).logits[0]
    else:
        offset = 0 if arch == "bert" or arch == "electra" else model.config.pad_token_id + 1
        positions = shifted_positions(INPUT_IDS.shape[1]) + offset
        wrong = model(input_ids=INPUT_IDS, position_ids=positions).logits[0]
    assert moved(right, wrong) >= MIN_MOVE


def test_distilbert_fixture_sees_a_wrong_position(tmp_path: Path):
    from tests.engine.test_other_encoders import distilbert_config, write_encoder

    config: DistilBertConfig = distilbert_config()
    model = head_class("token").from_pretrained(write_encoder(config, tmp_path / "distilbert")).eval()
    with torch.inference_mode():
        right = model(input_ids=INPUT_IDS).logits[0]
        embeddings = model.base_model.embeddings.position_embeddings.weight
        embeddings[INPUT_IDS.shape[1] - 1] = embeddings[INPUT_IDS.shape[1]].clone()  # the last token one on
        wrong = model(input_ids=INPUT_IDS).logits[0]
    assert moved(right, wrong) >= MIN_MOVE
