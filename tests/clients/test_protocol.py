"""The shared request/response module, without a server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from promptserve_client import (
    ClassifyResponse,
    Info,
    InternalError,
    LabelScore,
    OverloadedError,
    PromptserveError,
    TaskRecord,
    TokenLabel,
    UnavailableError,
    ValidationError,
)
from promptserve_client._protocol import (
    classify_call,
    error_of,
    generate_call,
    parse_event,
    read_adapter,
    register_call,
    score_call,
    task_path,
)
from tests.clients.canned_server import TASK_RECORD


def test_generate_call_single_task_body() -> None:
    call = generate_call("x", "a", None, "vote", {"max_new_tokens": 3}, stream=False)
    assert (call.method, call.path) == ("POST", "/v1/generate")
    assert call.json == {"inputs": "x", "task_id": "a", "parameters": {"max_new_tokens": 3}}


def test_generate_call_ensemble_body_on_stream_path() -> None:
    call = generate_call("x", None, ("a", "b"), "mean", {}, stream=True)
    assert call.path == "/v1/generate_stream"
    assert call.json == {"inputs": "x", "task_ids": ["a", "b"], "ensemble": "mean", "parameters": {}}


def test_task_path_escapes_id() -> None:
    assert task_path("a/b") == "/v1/tasks/a%2Fb"


@pytest.mark.parametrize("task_id", [".", ".."])
def test_task_path_escapes_dot_segments_a_url_would_drop(task_id: str) -> None:
    path = task_path(task_id)
    assert httpx.URL(f"http://x{path}").path == f"/v1/tasks/{task_id}"  # not /v1/tasks or /v1


def test_task_path_validation_error_when_id_empty() -> None:
    with pytest.raises(ValidationError, match="found ''"):
        task_path("")


def test_read_adapter_error_when_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no directory"):
        read_adapter(tmp_path / "missing")


def test_error_of_uses_error_type_from_body() -> None:
    response = httpx.Response(422, json={"error": "top_p: expected ...", "error_type": "validation"})
    error = error_of(response)
    assert isinstance(error, ValidationError) and error.message == "top_p: expected ..."


def test_error_of_falls_back_on_status_without_json() -> None:
    error = error_of(httpx.Response(502, text="<html>bad gateway</html>"))
    assert isinstance(error, InternalError) and error.status == 502


def test_error_of_overloaded_reads_retry_after() -> None:
    response = httpx.Response(429, json={"error": "full", "error_type": "overloaded"}, headers={"Retry-After": "4"})
    error = error_of(response)
    assert isinstance(error, OverloadedError) and error.retry_after == 4.0


def test_error_of_unknown_error_type_is_base_error() -> None:
    error = error_of(httpx.Response(400, json={"error": "?", "error_type": "from_the_future"}))
    assert type(error) is ValidationError  # unknown type: the status decides


def test_parse_event_error_payload_raises_typed() -> None:
    with pytest.raises(UnavailableError, match="stopping"):
        parse_event('{"error": "stopping", "error_type": "unavailable"}')


def test_all_errors_share_base() -> None:
    assert issubclass(OverloadedError, PromptserveError)


def test_classify_call_single_task_body() -> None:
    call = classify_call("x", "a", None, None, None)
    assert (call.method, call.path) == ("POST", "/v1/classify")
    assert call.json == {"inputs": "x", "task_id": "a", "parameters": {"top_k": None}}


def test_classify_call_batch_ensemble_body() -> None:
    call = classify_call(("x", "y"), None, ("a", "b"), "mean", 2)
    assert call.json == {
        "inputs": ["x", "y"],
        "task_id": None,
        "task_ids": ["a", "b"],
        "ensemble": "mean",
        "parameters": {"top_k": 2},
    }


def test_score_call_body_keeps_candidate_order() -> None:
    call = score_call("x", ("no", "yes"), "a", None)
    assert (call.method, call.path) == ("POST", "/v1/score")
    assert call.json == {"inputs": "x", "candidates": ["no", "yes"], "task_id": "a"}


def test_score_call_ensemble_body() -> None:
    assert score_call("x", ["y"], None, ["a", "b"]).json == {
        "inputs": "x",
        "candidates": ["y"],
        "task_id": None,
        "task_ids": ["a", "b"],
    }


def test_score_call_type_error_when_candidates_one_string() -> None:
    with pytest.raises(TypeError, match="candidates: expected a list of strings; found the string 'yes'"):
        score_call("x", "yes", "a", None)


def test_classify_call_type_error_when_input_not_a_string() -> None:
    with pytest.raises(TypeError, match=r"inputs: expected a list of strings; found also \[3\]"):
        classify_call(["x", 3], "a", None, None, None)  # type: ignore[list-item]


def test_classify_response_parses_sequence_prediction() -> None:
    body = {"predictions": [[{"label": "pos", "score": 0.9}, {"label": "neg", "score": 0.1}]]}
    response = ClassifyResponse.model_validate(body)
    assert response.predictions == [[LabelScore(label="pos", score=0.9), LabelScore(label="neg", score=0.1)]]


def test_classify_response_token_entry_keeps_token_and_offsets() -> None:
    entry = {"token": "Paris", "start": 3, "end": 8, "label": "B-LOC", "score": 0.8}
    response = ClassifyResponse.model_validate({"predictions": [[entry], []]})
    assert response.predictions == [[TokenLabel.model_validate(entry)], []]


def test_classify_response_validation_error_when_entry_lacks_score() -> None:
    with pytest.raises(ValueError, match="score"):
        ClassifyResponse.model_validate({"predictions": [[{"label": "pos"}]]})


def test_task_record_parses_without_nlu_fields() -> None:  # a server from before task types
    record = TaskRecord.model_validate(TASK_RECORD)
    assert (record.task_type, record.labels) == (None, None)


def test_task_record_parses_task_type_and_labels() -> None:
    record = TaskRecord.model_validate({**TASK_RECORD, "task_type": "SEQ_CLS", "labels": ["neg", "pos"]})
    assert (record.task_type, record.labels) == ("SEQ_CLS", ["neg", "pos"])


def test_info_parses_model_kind_and_endpoints() -> None:
    fields: dict[str, object] = {
        name: 1 for name in ("hidden_size", "num_layers", "num_key_value_heads", "head_dim", "vocab_size")
    }
    fields |= {name: 1 for name in ("max_batch_size", "max_batch_tokens", "max_virtual_tokens", "num_tasks")}
    fields |= {name: "x" for name in ("model_id", "model_type", "dtype", "device", "version")}
    info = Info.model_validate({**fields, "model_kind": "encoder", "endpoints": ["/v1/classify"]})
    assert (info.model_kind, info.endpoints) == ("encoder", ["/v1/classify"])


# ---- label names of a task upload


def write_config(adapter_dir: Path, config: object) -> None:
    (adapter_dir / "config.json").write_text(json.dumps(config))


def labels_part(adapter_dir: Path, labels: list[str] | None = None) -> object:
    files = register_call("t", adapter_dir, labels).files
    assert files is not None
    part = files.get("labels")
    return None if part is None else (part[0], json.loads(part[1]), part[2])


def test_register_call_labels_part_from_argument(adapter_dir: Path) -> None:
    assert labels_part(adapter_dir, ["neg", "pos"]) == ("labels.json", ["neg", "pos"], "application/json")


def test_register_call_no_labels_part_without_argument_or_config(adapter_dir: Path) -> None:
    assert labels_part(adapter_dir) is None


def test_register_call_labels_from_config_id2label_ordered_by_id(adapter_dir: Path) -> None:
    labels = [f"L{i}" for i in range(12)]
    write_config(adapter_dir, {"model_type": "bert", "id2label": {str(i): labels[i] for i in reversed(range(12))}})
    assert labels_part(adapter_dir) == ("labels.json", labels, "application/json")  # "10" after "9", not after "1"


def test_register_call_labels_json_of_a_stored_version_wins_over_config(adapter_dir: Path) -> None:
    # A version copied out of a server's store: labels.json is what the server kept (as its register_dir reads it).
    write_config(adapter_dir, {"id2label": {"0": "a", "1": "b"}})
    (adapter_dir / "labels.json").write_text(json.dumps(["negative", "positive"]))
    assert labels_part(adapter_dir) == ("labels.json", ["negative", "positive"], "application/json")


@pytest.mark.parametrize("content", ['{"0": "a"}', "[1, 2]", "not json"])
def test_register_call_value_error_when_labels_json_malformed(adapter_dir: Path, content: str) -> None:
    (adapter_dir / "labels.json").write_text(content)
    with pytest.raises(ValueError, match=r"labels\.json: expected a JSON array of label names; found"):
        register_call("t", adapter_dir)


def test_register_call_labels_argument_overrides_config(adapter_dir: Path) -> None:
    write_config(adapter_dir, {"id2label": {"0": "a", "1": "b"}})
    assert labels_part(adapter_dir, ["x", "y"]) == ("labels.json", ["x", "y"], "application/json")


def test_register_call_no_labels_part_when_config_has_no_id2label(adapter_dir: Path) -> None:
    write_config(adapter_dir, {"model_type": "bert"})
    assert labels_part(adapter_dir) is None


@pytest.mark.parametrize(
    ("id2label", "message"),
    [
        ({"0": "a", "2": "c"}, r"expected the ids \['0', '1'\] \(0\.\.N-1, each once\); found \['0', '2'\]"),
        ({"1": "a", "2": "b"}, r"expected the ids \['0', '1'\].*found \['1', '2'\]"),
        ({"0": "a", "one": "b"}, r"expected the ids \['0', '1'\].*found \['0', 'one'\]"),
        ({"0": "a", "1": 1}, r"expected a string label name for every id; found \{'1': 1\}"),
        ({}, r"expected an object of ids \"0\"\.\.\"N-1\" to label names; found \{\}"),
        (["a", "b"], r"expected an object of ids .*; found \['a', 'b'\]"),
    ],
)
def test_register_call_value_error_when_id2label_malformed(adapter_dir: Path, id2label: object, message: str) -> None:
    write_config(adapter_dir, {"id2label": id2label})
    with pytest.raises(ValueError, match=r"config\.json: id2label: " + message):
        register_call("t", adapter_dir)


def test_register_call_value_error_when_config_not_json(adapter_dir: Path) -> None:
    (adapter_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"expected a JSON object .*; found invalid JSON"):
        register_call("t", adapter_dir)


def test_register_call_value_error_when_config_not_an_object(adapter_dir: Path) -> None:
    write_config(adapter_dir, ["id2label"])
    with pytest.raises(ValueError, match=r"expected a JSON object .*; found list"):
        register_call("t", adapter_dir)


def test_register_call_type_error_when_labels_one_string(adapter_dir: Path) -> None:
    with pytest.raises(TypeError, match="labels: expected a list of strings; found the string 'neg,pos'"):
        register_call("t", adapter_dir, "neg,pos")
