"""Classification and scoring over HTTP on a real tiny engine (issue 13): an encoder's /info and its SEQ_CLS and
TOKEN_CLS tasks with label names; /v1/classify answers as PEFT's forward does (1e-5), /v1/score on a causal LM as an
uncached forward (1e-4); a task or backbone of the wrong kind for the route is a 400 that says which route serves it.

Two engines, each built once for the module: a RoBERTa encoder and the session's tiny Llama."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.api.app import create_app
from server.api.settings import Settings
from server.engine.async_engine import build_engine
from tests.api.helpers import metric_samples
from tests.fixtures import TinyBackbone
from tests.nlu_fixtures import (
    encoder_tokenizer,
    load_nlu_peft,
    nlu_reference,
    peft_logits,
    write_nlu_adapter,
    write_nlu_backbone,
)

TEXTS = ["Hello world", "ok", "a longer input, with punctuation!"]
NAMES = ["negative", "neutral", "positive"]  # the encoder's sequence tasks: three labels
CANDIDATES = ["yes", "no way", "x"]
ATOL = 1e-5


@dataclass
class Served:
    client: TestClient
    backbone_dir: Path
    adapters: dict[str, Path]  # task id -> its PEFT directory
    registrations: dict[str, Any]  # task id -> the PUT response


def files(adapter: Path) -> dict[str, tuple[str, bytes, str]]:
    """The two file parts of a task upload, read from a PEFT directory."""
    config, model = (adapter / "adapter_config.json").read_bytes(), (adapter / "adapter_model.safetensors").read_bytes()
    return {"adapter_config": ("adapter_config.json", config, "application/json"),
            "adapter_model": ("adapter_model.safetensors", model, "application/octet-stream")}  # fmt: skip


@contextmanager
def serving(model: Path, store: Path) -> Iterator[TestClient]:
    settings = Settings(model=str(model), store_dir=str(store), device="cpu", poll_interval_s=0, demo_tasks=False)
    engine = build_engine(settings.engine)
    try:
        with TestClient(create_app(Settings(demo_tasks=False), engine)) as client:
            yield client
    finally:
        engine.shutdown()


def requests_total(client: TestClient, endpoint: str, task: str, outcome: str) -> float:
    samples = metric_samples(client.get("/metrics").text)
    key = ("promptserve_requests_total", (("endpoint", endpoint), ("outcome", outcome), ("task", task)))
    return samples.get(key, 0.0)


def error_of(response: Any) -> str:
    """The message of the native shape or of OpenAI's."""
    error = response.json()["error"]
    return error["message"] if isinstance(error, dict) else error


# ---- an encoder: sequence and token tasks


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("nlu-http-encoder")
    backbone_dir = write_nlu_backbone("roberta", root / "backbone")  # its own (random) sequence head: the bare head
    adapters = {
        "sentiment": write_nlu_adapter(backbone_dir, "seq", "prefix", root / "sentiment", 3, seed=1),
        "sentiment-soft": write_nlu_adapter(backbone_dir, "seq", "prompt_tuning", root / "soft", 5, seed=2),
        "tagger": write_nlu_adapter(backbone_dir, "token", "p_tuning_mlp", root / "tagger", 4, seed=3),
    }
    names = json.dumps(NAMES)
    labels_file = {"labels": ("labels.json", names.encode(), "application/json")}
    with serving(backbone_dir, root / "store") as client:
        registrations = {
            "sentiment": client.put("/v1/tasks/sentiment", files=files(adapters["sentiment"]), data={"labels": names}),
            "sentiment-soft": client.put(
                "/v1/tasks/sentiment-soft", files={**files(adapters["sentiment-soft"]), **labels_file}
            ),
            "tagger": client.put("/v1/tasks/tagger", files=files(adapters["tagger"])),
        }
        yield Served(client, backbone_dir, adapters, registrations)


def test_info_says_encoder_with_classify_only(encoder: Served) -> None:
    info = encoder.client.get("/info").json()
    assert info["model_kind"] == "encoder"
    assert "/v1/classify" in info["endpoints"]
    assert not {"/v1/generate", "/v1/generate_stream", "/v1/completions", "/v1/score"} & set(info["endpoints"])


def test_register_classifiers_with_labels_as_a_field_a_file_or_by_default(encoder: Served) -> None:
    assert {response.status_code for response in encoder.registrations.values()} == {201}
    records = {task_id: response.json() for task_id, response in encoder.registrations.items()}
    types = {task_id: record["task_type"] for task_id, record in records.items()}
    assert types == {"sentiment": "SEQ_CLS", "sentiment-soft": "SEQ_CLS", "tagger": "TOKEN_CLS"}
    assert records["sentiment"]["labels"] == records["sentiment-soft"]["labels"] == NAMES
    assert records["tagger"]["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    listed = {record["task_id"]: record for record in encoder.client.get("/v1/tasks").json()["tasks"]}
    assert {task_id: listed[task_id] for task_id in records} == records


def test_register_wrong_label_count_is_422_saying_expected_and_found(encoder: Served) -> None:
    response = encoder.client.put("/v1/tasks/two-names", files=files(encoder.adapters["sentiment"]),
                                  data={"labels": '["negative", "positive"]'})  # fmt: skip
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation"
    assert "expected 3 names" in response.json()["error"] and "found 2" in response.json()["error"]
    assert encoder.client.get("/v1/tasks/two-names").status_code == 404


def test_register_causal_adapter_on_encoder_is_422_naming_both_kinds(encoder: Served, tiny_llama: TinyBackbone) -> None:
    response = encoder.client.put("/v1/tasks/causal", files=files(tiny_llama.adapters["prompt_tuning"]))
    assert response.status_code == 422
    message = response.json()["error"]
    assert "CAUSAL_LM" in message and "SEQ_CLS" in message and "TOKEN_CLS" in message


def test_register_new_labels_is_a_new_version_answering_with_them(encoder: Served) -> None:
    adapter = encoder.adapters["sentiment-soft"]
    first = encoder.client.put("/v1/tasks/relabelled", files=files(adapter), data={"labels": '["a", "b", "c"]'})
    second = encoder.client.put("/v1/tasks/relabelled", files=files(adapter), data={"labels": '["x", "y", "z"]'})
    assert (first.status_code, second.status_code) == (201, 200)
    assert (second.json()["version"], second.json()["labels"]) == (2, ["x", "y", "z"])
    answer = encoder.client.post("/v1/classify", json={"inputs": "hi", "task_id": "relabelled"}).json()
    assert {entry["label"] for entry in answer["predictions"][0]} == {"x", "y", "z"}


def assert_labels_match(prediction: list[dict], probs: torch.Tensor, names: list[str]) -> None:
    """A sequence answer: every label once, highest score first, each score the reference's probability."""
    assert [entry["score"] for entry in prediction] == sorted((entry["score"] for entry in prediction), reverse=True)
    assert sorted(entry["label"] for entry in prediction) == sorted(names)
    for entry in prediction:
        assert abs(entry["score"] - float(probs[names.index(entry["label"])])) < ATOL, entry


def test_classify_sequence_task_answers_each_input_in_order_as_peft(encoder: Served) -> None:
    response = encoder.client.post("/v1/classify", json={"inputs": TEXTS, "task_id": "sentiment"})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    reference = nlu_reference(encoder.backbone_dir, encoder.adapters["sentiment"], TEXTS, "seq")
    assert len(predictions) == len(TEXTS)
    for prediction, probs in zip(predictions, reference, strict=True):
        assert_labels_match(prediction, probs, NAMES)


def test_classify_without_task_uses_the_checkpoints_own_head(encoder: Served) -> None:
    predictions = encoder.client.post("/v1/classify", json={"inputs": TEXTS, "task_id": None}).json()["predictions"]
    reference = nlu_reference(encoder.backbone_dir, None, TEXTS, "seq")
    for prediction, probs in zip(predictions, reference, strict=True):
        assert_labels_match(prediction, probs, ["LABEL_0", "LABEL_1", "LABEL_2"])


def test_classify_mean_ensemble_averages_its_members(encoder: Served) -> None:
    members = ["sentiment", "sentiment-soft"]
    body = {"inputs": TEXTS, "task_ids": members, "ensemble": "mean"}
    predictions = encoder.client.post("/v1/classify", json=body).json()["predictions"]
    references = [nlu_reference(encoder.backbone_dir, encoder.adapters[m], TEXTS, "seq") for m in members]
    for i, prediction in enumerate(predictions):
        assert_labels_match(prediction, (references[0][i] + references[1][i]) / 2, NAMES)


def test_classify_top_k_keeps_the_best_labels(encoder: Served) -> None:
    full = encoder.client.post("/v1/classify", json={"inputs": TEXTS, "task_id": "sentiment"}).json()["predictions"]
    for k in (1, 2, 5):
        body = {"inputs": TEXTS, "task_id": "sentiment", "parameters": {"top_k": k}}
        assert encoder.client.post("/v1/classify", json=body).json()["predictions"] == [p[:k] for p in full]


def test_classify_top_k_on_a_token_task_is_refused(encoder: Served) -> None:
    body = {"inputs": TEXTS, "task_id": "tagger", "parameters": {"top_k": 1}}
    response = encoder.client.post("/v1/classify", json=body)
    assert response.status_code == 422
    assert response.json()["error"].startswith("parameters.top_k: expected null for a TOKEN_CLS task"), response.text


def test_classify_a_string_input_is_one_prediction(encoder: Served) -> None:
    one = encoder.client.post("/v1/classify", json={"inputs": TEXTS[2], "task_id": "sentiment"}).json()
    listed = encoder.client.post("/v1/classify", json={"inputs": [TEXTS[2]], "task_id": "sentiment"}).json()
    assert len(one["predictions"]) == 1 and one == listed


def byte_spans(text: str) -> list[tuple[int, int]]:
    """The byte-level tokenizer makes one token per UTF-8 byte: each covers the character the byte belongs to."""
    return [(i, i + 1) for i, char in enumerate(text) for _ in char.encode()]


@pytest.mark.parametrize("text", ["Hello world", "héllo wörld!"])
def test_classify_token_task_labels_each_input_token_as_peft(encoder: Served, text: str) -> None:
    response = encoder.client.post("/v1/classify", json={"inputs": [text], "task_id": "tagger"})
    assert response.status_code == 200
    entries = response.json()["predictions"][0]
    assert [(entry["start"], entry["end"]) for entry in entries] == byte_spans(text)  # <s> and </s> left out
    assert [entry["token"] for entry in entries] == [text[start:end] for start, end in byte_spans(text)]
    num_tokens = len(encoder_tokenizer()(text)["input_ids"])
    probs = nlu_reference(encoder.backbone_dir, encoder.adapters["tagger"], [text], "token")[0]
    rows = probs[-num_tokens:][1:-1]  # PEFT's rows: the virtual tokens', then <s>, the input's, </s>
    for entry, row in zip(entries, rows, strict=True):
        assert abs(entry["score"] - float(row.max())) < ATOL, entry
        assert entry["label"] == f"LABEL_{int(row.argmax())}"


def test_classify_ensemble_of_sequence_and_token_tasks_is_refused(encoder: Served) -> None:
    response = encoder.client.post("/v1/classify", json={"inputs": "hi", "task_ids": ["sentiment", "tagger"]})
    assert response.status_code == 422
    assert (
        "expected ensemble members of one task type with the same label names; found sentiment: SEQ_CLS ["
        in (response.json()["error"])
    )
    assert "tagger: TOKEN_CLS [" in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": ["x"] * 257}, "inputs: expected 1 to 256 inputs; found 257"),
        ({"inputs": []}, "inputs: expected 1 to 256 inputs; found 0"),
        ({"inputs": 5}, "inputs: expected a string or a list of strings; found 5"),
        ({"inputs": ["a", 5]}, "inputs: expected a string or a list of strings; found ['a', 5]"),
    ],
)
def test_classify_bad_inputs_get_one_clear_message(encoder: Served, body: dict[str, Any], message: str) -> None:
    response = encoder.client.post("/v1/classify", json={**body, "task_id": "sentiment"})
    assert response.status_code == 422 and response.json()["error"].startswith(message), response.json()


def test_classify_an_input_past_the_positions_is_413_naming_which(encoder: Served) -> None:
    """One input of a batch too long for the positions beside the task's 5 virtual tokens: the message names it and
    the numbers; the task and the server go on."""
    response = encoder.client.post("/v1/classify", json={"inputs": ["ok", "x" * 200], "task_id": "sentiment-soft"})
    assert response.status_code == 413
    assert response.json()["error"] == (
        "inputs[1]: expected at most 123 tokens (the backbone's 128 positions less 5 virtual tokens); found 202"
    )
    assert encoder.client.post("/v1/classify", json={"inputs": "ok", "task_id": "sentiment-soft"}).status_code == 200


@pytest.mark.parametrize("target", [{"task_id": "nope"}, {"task_ids": ["sentiment", "nope"]}])
def test_classify_unknown_task_is_404(encoder: Served, target: dict[str, Any]) -> None:
    response = encoder.client.post("/v1/classify", json={"inputs": "hi", **target})
    assert response.status_code == 404
    assert response.json() == {"error": "task 'nope' is not registered", "error_type": "not_found"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/generate", {"inputs": "hi"}),
        ("/v1/generate", {"inputs": "hi", "task_id": "sentiment"}),
        ("/v1/generate_stream", {"inputs": "hi"}),
        ("/v1/completions", {"model": "sentiment", "prompt": "hi"}),
        ("/v1/chat/completions", {"model": "sentiment", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/score", {"inputs": "hi", "candidates": ["a"]}),
    ],
)
def test_generation_and_scoring_on_encoder_are_400(encoder: Served, path: str, body: dict[str, Any]) -> None:
    response = encoder.client.post(path, json=body)
    assert response.status_code == 400
    assert "encoder" in error_of(response) and "use /v1/classify" in error_of(response)


def test_metrics_count_classify_requests_by_task_and_outcome(encoder: Served) -> None:
    client = encoder.client
    series = [("classify", "tagger", "success"), ("classify", "_other", "not_found")]  # unknown ids take no label
    before = [requests_total(client, *labels) for labels in series]
    client.post("/v1/classify", json={"inputs": ["a", "b"], "task_id": "tagger"}).raise_for_status()
    assert client.post("/v1/classify", json={"inputs": "a", "task_id": "missing"}).status_code == 404
    assert [requests_total(client, *labels) for labels in series] == [before[0] + 1, before[1] + 1]


# ---- a causal LM: scoring under generation tasks, a SEQ_CLS task on its last token


@pytest.fixture(scope="module")
def causal(tiny_llama: TinyBackbone, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("nlu-http-causal")
    adapters = {kind: tiny_llama.adapters[kind] for kind in ("prompt_tuning", "prefix")}
    adapters["yesno"] = write_nlu_adapter(tiny_llama.path, "seq", "prompt_tuning", root / "yesno", 4, seed=5)
    with serving(tiny_llama.path, root / "store") as client:
        registrations = {
            task_id: client.put(f"/v1/tasks/{task_id}", files=files(adapter),
                                data={"labels": '["no", "yes"]'} if task_id == "yesno" else None)
            for task_id, adapter in adapters.items()
        }  # fmt: skip
        assert all(response.status_code == 201 for response in registrations.values()), registrations
        yield Served(client, tiny_llama.path, adapters, registrations)


@torch.no_grad()
def candidate_logprobs(backbone_dir: Path, adapter: Path, text: str) -> list[list[float]]:
    """Each candidate's token log-probabilities after `text`, from one uncached forward of PEFT's model (a prefix
    task: what PEFT's forward would run on transformers 5.24, see tests/nlu_fixtures.py)."""
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    base = AutoModelForCausalLM.from_pretrained(backbone_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter).eval()
    prompt = tokenizer(text)["input_ids"]  # the input with the tokenizer's defaults (<s> first)
    out = []
    for candidate in CANDIDATES:
        targets = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + targets])
        logits = peft_logits(model, ids, torch.ones_like(ids))
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        first = logits.shape[1] - ids.shape[1] + len(prompt) - 1  # past a prompt task's virtual rows
        out.append([float(logprobs[first + j, token]) for j, token in enumerate(targets)])
    return out


def test_info_says_causal_with_score_and_classify(causal: Served) -> None:
    info = causal.client.get("/info").json()
    assert info["model_kind"] == "causal"
    assert {"/v1/generate", "/v1/score", "/v1/classify"} <= set(info["endpoints"])


@pytest.mark.parametrize("task_id", ["prompt_tuning", "prefix"])
def test_score_equals_an_uncached_forward(causal: Served, task_id: str) -> None:
    body = {"inputs": "Is it true?", "candidates": CANDIDATES, "task_id": task_id}
    response = causal.client.post("/v1/score", json=body)
    assert response.status_code == 200
    answer = response.json()
    expected = candidate_logprobs(causal.backbone_dir, causal.adapters[task_id], "Is it true?")
    assert [score["candidate"] for score in answer["scores"]] == CANDIDATES
    for score, tokens in zip(answer["scores"], expected, strict=True):
        assert score["num_tokens"] == len(tokens)
        assert abs(score["logprob"] - sum(tokens)) < 1e-4, score
        assert score["mean_logprob"] == pytest.approx(score["logprob"] / score["num_tokens"], abs=1e-9)
    assert answer["best"] == CANDIDATES[max(range(len(CANDIDATES)), key=lambda i: sum(expected[i]))]
    assert answer["best"] == max(answer["scores"], key=lambda score: score["logprob"])["candidate"]


def test_score_ensemble_averages_the_members_logprobs(causal: Served) -> None:
    members = ["prompt_tuning", "prefix"]
    body = {"inputs": "Is it true?", "candidates": CANDIDATES, "task_ids": members}
    answer = causal.client.post("/v1/score", json=body).json()
    per_member = [candidate_logprobs(causal.backbone_dir, causal.adapters[m], "Is it true?") for m in members]
    for i, score in enumerate(answer["scores"]):
        assert abs(score["logprob"] - sum(sum(m[i]) for m in per_member) / 2) < 1e-4, score


def test_score_ensemble_other_than_mean_is_refused(causal: Served) -> None:
    body = {"inputs": "Is it true?", "candidates": CANDIDATES, "task_ids": ["prefix"], "ensemble": "vote"}
    response = causal.client.post("/v1/score", json=body)
    assert response.status_code == 422 and "ensemble: " in response.text and "'mean'" in response.text, response.text


def test_classify_causal_sequence_task_answers_as_peft(causal: Served) -> None:
    predictions = causal.client.post("/v1/classify", json={"inputs": TEXTS, "task_id": "yesno"}).json()["predictions"]
    model = load_nlu_peft(causal.backbone_dir, "seq", causal.adapters["yesno"])
    tokenizer = AutoTokenizer.from_pretrained(causal.backbone_dir)
    for text, prediction in zip(TEXTS, predictions, strict=True):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        probs = torch.softmax(peft_logits(model, ids, torch.ones_like(ids)).float(), dim=-1)[0]
        assert_labels_match(prediction, probs, ["no", "yes"])


def test_openai_models_list_only_what_the_openai_routes_serve(causal: Served) -> None:
    ids = {card["id"] for card in causal.client.get("/v1/models").json()["data"]}
    assert "yesno" not in ids  # a SEQ_CLS task answers on /v1/classify only
    assert {task_id for task_id in causal.registrations if task_id != "yesno"} <= ids


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/v1/score", {"inputs": "hi", "candidates": ["a"], "task_id": "yesno"}, "is a SEQ_CLS task: use /v1/classify"),
        ("/v1/generate", {"inputs": "hi", "task_id": "yesno"}, "is a SEQ_CLS task: use /v1/classify"),
        ("/v1/generate_stream", {"inputs": "hi", "task_id": "yesno"}, "is a SEQ_CLS task: use /v1/classify"),
        ("/v1/completions", {"model": "yesno", "prompt": "hi"}, "is a SEQ_CLS task: use /v1/classify"),
        ("/v1/classify", {"inputs": "hi", "task_id": "prefix"}, "is a CAUSAL_LM task: use /v1/generate"),
        ("/v1/classify", {"inputs": "hi"}, "no trained classification head of its own"),
    ],
)
def test_wrong_kind_of_task_for_the_route_is_400(
    causal: Served, path: str, body: dict[str, Any], expected: str
) -> None:
    response = causal.client.post(path, json=body)
    assert response.status_code == 400, response.text
    assert expected in error_of(response)


def test_metrics_count_score_requests_by_task_and_outcome(causal: Served) -> None:
    client = causal.client
    series = [("score", "prefix", "success"), ("classify", "prefix", "validation")]
    before = [requests_total(client, *labels) for labels in series]
    client.post("/v1/score", json={"inputs": "hi", "candidates": ["a", "b"], "task_id": "prefix"}).raise_for_status()
    assert client.post("/v1/classify", json={"inputs": "hi", "task_id": "prefix"}).status_code == 400
    assert [requests_total(client, *labels) for labels in series] == [before[0] + 1, before[1] + 1]
