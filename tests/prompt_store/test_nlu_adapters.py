"""The store's side of classification tasks (issue 13): PEFT SEQ_CLS/TOKEN_CLS adapters carry their head, checked
against the backbone's head modules; label names come at registration (or from a config.json next to the adapter)
and stay with the version on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from prompt_store.adapter import StoreLimits, parse_adapter
from prompt_store.errors import InvalidTask
from prompt_store.registry import TaskStore
from prompt_store.types import BackboneFingerprint
from server.engine.backbone import load_backbone
from tests.fixtures import TinyBackbone
from tests.lora_fixtures import write_module_adapter
from tests.nlu_fixtures import HIDDEN, NUM_LABELS, write_nlu_adapter, write_nlu_backbone

MODULES_TO_SAVE = r"PEFT saves a SEQ_CLS task's head when modules_to_save names it: \['classifier', 'pooler'\]"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("nlu-store")
    bert = write_nlu_backbone("bert", root / "bert")
    deberta_token = write_nlu_backbone("deberta_v2", root / "deberta-token", head="token")
    return {
        "root": root,
        "bert": load_backbone(str(bert), "cpu", "float32").fingerprint,
        "seq": write_nlu_adapter(bert, "seq", "prefix", root / "seq", 3, seed=0),
        "token": write_nlu_adapter(bert, "token", "prompt_tuning", root / "token", 5, seed=1),
        "deberta_token": load_backbone(str(deberta_token), "cpu", "float32").fingerprint,
        "deberta_seq": write_nlu_adapter(deberta_token, "seq", "prompt_tuning", root / "deberta-seq", 4, seed=2),
    }


def parse(adapter: Path, fp: BackboneFingerprint, labels: bytes | None = None, tensors: dict | None = None) -> Any:
    model = (adapter / "adapter_model.safetensors").read_bytes()
    if tensors is not None:
        path = adapter.parent / f"{adapter.name}-edited.safetensors"
        save_file(tensors, path)
        model = path.read_bytes()
    return parse_adapter((adapter / "adapter_config.json").read_bytes(), model, fp, StoreLimits(), labels)


def test_an_encoder_serves_sequence_and_token_heads_and_no_generation(built: dict[str, Any]) -> None:
    fp = built["bert"]
    assert fp.is_encoder and fp.task_types == ("SEQ_CLS", "TOKEN_CLS") and fp.takes_prefix
    seq = parse(built["seq"], fp)
    assert (seq.task_type, seq.labels) == ("SEQ_CLS", ("LABEL_0", "LABEL_1", "LABEL_2"))
    assert {name: tuple(t.shape) for name, t in seq.head.items()} == {
        "classifier.weight": (NUM_LABELS, HIDDEN),
        "classifier.bias": (NUM_LABELS,),
    }
    token = parse(built["token"], fp, json.dumps(["O", "B-X", "I-X"]).encode())
    assert (token.task_type, token.labels) == ("TOKEN_CLS", ("O", "B-X", "I-X"))


def test_a_generation_adapter_on_an_encoder_names_what_it_serves(built: dict[str, Any], tiny_llama: TinyBackbone):
    with pytest.raises(InvalidTask, match=r"task_type must be 'SEQ_CLS' or 'TOKEN_CLS' \(an encoder bert backbone\)"):
        parse(tiny_llama.adapters["prompt_tuning"], built["bert"])


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (b'["a", "b"]', "labels: expected 3 names (the head's number of labels); found 2"),
        (b'["a", "a", "b"]', "labels: expected distinct names"),
        (b'{"0": "a"}', "labels: expected a JSON array of non-empty strings"),
        (b'["a", "", "b"]', "labels: expected a JSON array of non-empty strings"),
        (b"[not json", "labels: expected a JSON array of label names; found malformed JSON"),
    ],
)
def test_bad_label_names_are_refused(built: dict[str, Any], labels: bytes, message: str) -> None:
    with pytest.raises(InvalidTask, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(built["seq"], built["bert"], labels)


def test_a_head_that_does_not_fit_the_backbone_is_refused(built: dict[str, Any]) -> None:
    tensors = load_file(built["seq"] / "adapter_model.safetensors")
    no_head = {"prompt_embeddings": tensors["prompt_embeddings"]}
    with pytest.raises(
        InvalidTask, match=r"expected the tensors .*'base_model.classifier.weight'.*PEFT saves a SEQ_CLS"
    ):
        parse(built["seq"], built["bert"], tensors=no_head)
    narrow = tensors | {"base_model.classifier.weight": torch.zeros(NUM_LABELS, HIDDEN - 1)}
    with pytest.raises(InvalidTask, match=r"base_model.classifier.weight must have shape \['num_labels', 32\]"):
        parse(built["seq"], built["bert"], tensors=narrow)
    disagreeing = tensors | {"base_model.classifier.bias": torch.zeros(NUM_LABELS + 1)}
    with pytest.raises(
        InvalidTask, match=r"weight must have shape .* with num_labels 4 as in the other head tensors; found \[3, 32\]"
    ):
        parse(built["seq"], built["bert"], tensors=disagreeing)
    poisoned = tensors | {"base_model.classifier.bias": torch.tensor([0.0, float("nan"), 0.0])}
    with pytest.raises(InvalidTask, match=r"base_model.classifier.bias must be finite"):
        parse(built["seq"], built["bert"], tensors=poisoned)


def test_a_pooler_the_backbone_never_trained_must_come_with_the_task(built: dict[str, Any]) -> None:
    """DeBERTa-v2's sequence head pools through a pooler PEFT does not save; a backbone saved without one (here a
    token classifier's) cannot reproduce a sequence task unless the adapter carries it (modules_to_save)."""
    fp = built["deberta_token"]
    assert not fp.takes_prefix  # its attention takes no past keys and values
    with pytest.raises(InvalidTask, match=r"'base_model.pooler.dense.bias', 'base_model.pooler.dense.weight'.*"
                       + MODULES_TO_SAVE):  # fmt: skip
        parse(built["deberta_seq"], fp)
    tensors = load_file(built["deberta_seq"] / "adapter_model.safetensors")
    pooler = {
        f"base_model.pooler.dense.{n}": torch.zeros(s) for n, s in (("weight", (HIDDEN, HIDDEN)), ("bias", (HIDDEN,)))
    }
    assert set(parse(built["deberta_seq"], fp, tensors=tensors | pooler).head) >= {"pooler.dense.weight"}


def test_a_lora_task_without_the_untrained_pooler_names_the_modules_to_save(
    built: dict[str, Any], tmp_path: Path
) -> None:
    """PEFT's default modules_to_save for SEQ_CLS names the classifier alone: the refusal says to name the pooler."""
    backbone = built["root"] / "deberta-token"
    lora = write_module_adapter(backbone, "lora", tmp_path / "lora", seed=0, auto=AutoModelForSequenceClassification,
                                task_type="SEQ_CLS", target_modules=["value_proj"])  # fmt: skip
    with pytest.raises(InvalidTask, match=r"missing \['base_model.model.pooler.dense.bias', .*" + MODULES_TO_SAVE):
        parse(lora, built["deberta_token"])


def test_prefix_tuning_is_refused_where_attention_takes_no_prefix(built: dict[str, Any]) -> None:
    config = json.loads((built["seq"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING"
    with pytest.raises(InvalidTask, match="peft_type must be PROMPT_TUNING or P_TUNING on this deberta-v2 backbone"):
        parse(built["seq"], built["deberta_token"])


def test_a_causal_backbone_serves_sequence_tasks_only(tiny_llama: TinyBackbone, tmp_path: Path) -> None:
    fp = load_backbone(str(tiny_llama.path), "cpu", "float32").fingerprint
    assert fp.task_types == ("CAUSAL_LM", "SEQ_CLS")
    seq = write_nlu_adapter(tiny_llama.path, "seq", "prompt_tuning", tmp_path / "seq", 4, seed=0)
    assert set(parse(seq, fp).head) == {"score.weight"}
    token = write_nlu_adapter(tiny_llama.path, "token", "prompt_tuning", tmp_path / "token", 4, seed=0)
    with pytest.raises(InvalidTask, match=r"task_type must be 'CAUSAL_LM' or 'SEQ_CLS'.*found 'TOKEN_CLS'"):
        parse(token, fp)
    with pytest.raises(InvalidTask, match="labels: expected none for a CAUSAL_LM task"):
        parse(tiny_llama.adapters["prefix"], fp, b'["a"]')


def test_labels_stay_with_the_version_and_come_from_a_config_next_to_the_adapter(built: dict[str, Any]) -> None:
    root = built["root"] / "store-labels"
    adapter = built["root"] / "with-config"
    shutil.copytree(built["seq"], adapter, dirs_exist_ok=True)
    (adapter / "config.json").write_text(json.dumps({"id2label": {"0": "neg", "1": "neu", "2": "pos"}}))
    store = TaskStore(root, built["bert"])
    record, _ = store.register_dir("sentiment", adapter)
    assert (record.task_type, record.labels) == ("SEQ_CLS", ("neg", "neu", "pos"))
    assert record.to_dict()["labels"] == ["neg", "neu", "pos"] and record.to_dict()["task_type"] == "SEQ_CLS"
    reopened = TaskStore(root, built["bert"])
    assert reopened.get("sentiment").labels == ("neg", "neu", "pos")
    assert reopened.load("sentiment").head.keys() == {"classifier.weight", "classifier.bias"}
    (adapter / "config.json").write_text(json.dumps({"id2label": {"0": "neg", "2": "pos"}}))
    with pytest.raises(InvalidTask, match=r"id2label must map the ids 0..N-1 to names"):
        store.register_dir("sentiment", adapter)
