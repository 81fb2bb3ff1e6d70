"""Encoders whose attention cannot use the engine's pool (DistilBERT's and ALBERT's layers carry no layer_idx):
they run padded on transformers' own attention, prompt and P-tuning token tasks equal to PEFT's forward (float32,
1e-5); a head that applies layers of its own, or input embeddings narrower than the prompts, are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import (
    AlbertConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertModel,
    DistilBertConfig,
    PretrainedConfig,
)

from prompt_store.errors import InvalidTask
from prompt_store.registry import TaskStore
from prompt_store.types import TOKEN_CLS
from server.engine.attention import Routing, attention_routing
from server.engine.backbone import load_backbone
from server.engine.default_backbone import BYTE_VOCAB_SIZE
from server.engine.errors import UnsupportedBackbone
from server.engine.selfcheck import self_check
from tests.engine.test_nlu import ATOL, TEXTS, Driver
from tests.fixtures import peft_config, strengthen
from tests.nlu_fixtures import (
    BOS_ID,
    EOS_ID,
    HEADS,
    HIDDEN,
    LAYERS,
    NUM_LABELS,
    PAD_ID,
    encoder_tokenizer,
    nlu_config,
    nlu_reference,
    write_nlu_adapter,
    write_nlu_backbone,
)

COMMON = {"vocab_size": BYTE_VOCAB_SIZE, "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
          "num_labels": NUM_LABELS, "initializer_range": 0.2, "max_position_embeddings": 128}  # fmt: skip


def distilbert_config() -> DistilBertConfig:
    return DistilBertConfig(**COMMON, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=64)


def albert_config(embedding_size: int = HIDDEN) -> AlbertConfig:
    return AlbertConfig(**COMMON, hidden_size=HIDDEN, embedding_size=embedding_size, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, intermediate_size=64)  # fmt: skip


def write_encoder(config: PretrainedConfig, out_dir: Path, head: type = AutoModelForTokenClassification) -> Path:
    torch.manual_seed(0)
    model = head.from_config(config)
    strengthen(model, seed=0)
    model.save_pretrained(out_dir)
    encoder_tokenizer().save_pretrained(out_dir)
    return out_dir


def write_token_adapter(backbone_dir: Path, kind: str, out_dir: Path, seed: int) -> Path:
    """A TOKEN_CLS adapter; PEFT cannot read DistilBERT's dims (`dim`, `n_layers`, `n_heads`): they are given."""
    torch.manual_seed(seed)
    config = peft_config(kind, 4, TOKEN_CLS)
    config.token_dim, config.num_layers, config.num_attention_heads = HIDDEN, LAYERS, HEADS
    model = get_peft_model(AutoModelForTokenClassification.from_pretrained(backbone_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.normal_(0.0, 1.0 if "prompt_encoder" in name else 0.5)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize("arch", ["distilbert", "albert"])
def test_unindexed_encoder_token_tasks_run_padded_and_equal_peft(arch: str, tmp_path: Path) -> None:
    backbone_dir = write_encoder(distilbert_config() if arch == "distilbert" else albert_config(), tmp_path / "bb")
    backbone = load_backbone(str(backbone_dir), "cpu", "float32")
    assert backbone.kind.name == "encoder" and not backbone.kind.packed
    assert not backbone.fingerprint.takes_prefix and set(backbone.heads) == {TOKEN_CLS}
    store = TaskStore(tmp_path / "store", backbone.fingerprint)
    kinds = ("prompt_tuning", "p_tuning_mlp")
    adapters = {kind: write_token_adapter(backbone_dir, kind, tmp_path / kind, seed) for seed, kind in enumerate(kinds)}
    for kind, adapter in adapters.items():
        store.register_dir(kind, adapter)
    assert self_check(Driver(backbone, store).engine) > 0
    driver = Driver(backbone, store)
    answers = {(kind, text): driver.classify_probs(text, kind) for kind in kinds for text in TEXTS}
    driver.run()
    assert driver.steps[0].batch_size == len(answers)  # every task's rows in one padded pass
    for kind, adapter in adapters.items():
        for text, expected in zip(TEXTS, nlu_reference(backbone_dir, adapter, list(TEXTS), "token"), strict=True):
            got = answers[kind, text]()
            torch.testing.assert_close(got, expected[-got.shape[0] :], rtol=0, atol=ATOL, msg=f"{kind} on {text!r}")


def test_a_prefix_task_is_refused_on_an_unindexed_encoder(tmp_path: Path) -> None:
    backbone_dir = write_encoder(distilbert_config(), tmp_path / "bb")
    backbone = load_backbone(str(backbone_dir), "cpu", "float32")
    store = TaskStore(tmp_path / "store", backbone.fingerprint)
    with pytest.raises(InvalidTask, match="peft_type must be PROMPT_TUNING or P_TUNING on this distilbert"):
        store.register_dir("prefix", write_token_adapter(backbone_dir, "prefix", tmp_path / "prefix", 0))


@pytest.mark.parametrize("arch", ["distilbert", "albert"])
def test_a_sequence_head_with_layers_of_its_own_is_not_served(arch: str, tmp_path: Path) -> None:
    """DistilBERT's head runs `pre_classifier` and ALBERT's a tanh outside its linear pooler: the engine's head
    would skip them, so there is no SEQ_CLS head and a SEQ_CLS task is refused at registration."""
    config = distilbert_config() if arch == "distilbert" else albert_config()
    backbone_dir = write_encoder(config, tmp_path / "bb", AutoModelForSequenceClassification)
    backbone = load_backbone(str(backbone_dir), "cpu", "float32")
    assert set(backbone.heads) == {TOKEN_CLS} and backbone.bare_head is None  # nor the checkpoint's own
    store = TaskStore(tmp_path / "store", backbone.fingerprint)
    bert_dir = write_nlu_backbone("bert", tmp_path / "bert")
    adapter = write_nlu_adapter(bert_dir, "seq", "prompt_tuning", tmp_path / "seq", 4, seed=0)
    with pytest.raises(InvalidTask, match="task_type must be 'TOKEN_CLS'"):
        store.register_dir("seq", adapter)


def test_an_encoder_with_narrower_input_embeddings_is_refused_at_start_up(tmp_path: Path) -> None:
    backbone_dir = write_encoder(albert_config(embedding_size=16), tmp_path / "bb")
    with pytest.raises(UnsupportedBackbone, match=r"found albert with 16-wide input embeddings.*Encoders served"):
        load_backbone(str(backbone_dir), "cpu", "float32")


def test_an_attention_that_fails_the_probe_is_not_routed(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = BertModel(nlu_config("bert"), add_pooling_layer=False).eval()
    encoder.set_attn_implementation("eager")
    assert attention_routing(encoder) is Routing.OWN  # never reaches the engine's attention
    encoder.set_attn_implementation("promptserve")
    assert attention_routing(encoder) is Routing.POOL

    def broken(*args: object, **kwargs: object) -> None:
        raise AttributeError("something this attention lacks")

    monkeypatch.setattr(encoder.encoder.layer[0].attention.self, "forward", broken)
    assert attention_routing(encoder) is Routing.OWN
