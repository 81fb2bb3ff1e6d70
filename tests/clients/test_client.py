"""The blocking `Client` against the app: every method, typed answers, typed errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from promptserve_client import (
    CandidateScore,
    Client,
    InternalError,
    LabelScore,
    NotFoundError,
    OverloadedError,
    TokenLabel,
    TooLargeError,
    UnauthorizedError,
    UnavailableError,
    ValidationError,
)
from tests.api.fake_engine import FakeEngine, answer_of
from tests.clients.canned_server import TASK_RECORD, CannedServer


def test_health_ok(client: Client) -> None:
    assert client.health().status == "ok"


def test_info_typed(client: Client) -> None:
    info = client.info()
    assert (info.model_id, info.num_tasks) == ("fake/tiny", 2)


def test_register_task_uploads_adapter_dir(client: Client, adapter_dir: Path, engine: FakeEngine) -> None:
    record = client.register_task("new-task", adapter_dir)
    assert (record.task_id, record.version, record.method, record.num_virtual_tokens) == ("new-task", 1, "p_tuning", 6)
    assert engine.tasks["new-task"].bytes == (adapter_dir / "adapter_config.json").stat().st_size + 64


def test_register_task_new_version_when_replaced(client: Client, adapter_dir: Path) -> None:
    client.register_task("a", adapter_dir)
    assert client.get_task("a").version == 2


def test_register_task_file_not_found_names_missing_file(client: Client, adapter_dir: Path) -> None:
    (adapter_dir / "adapter_model.safetensors").rename(adapter_dir / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors"):
        client.register_task("x", adapter_dir)


def test_list_tasks_typed_records(client: Client) -> None:
    assert [record.task_id for record in client.list_tasks()] == ["a", "b"]


def test_get_task_parses_created_at(client: Client) -> None:
    assert client.get_task("a").created_at.tzinfo is not None


def test_delete_task_then_not_found(client: Client) -> None:
    client.delete_task("a")
    with pytest.raises(NotFoundError, match="'a' is not registered"):
        client.get_task("a")


def test_generate_returns_text(client: Client) -> None:
    assert client.generate("hello", task_id="a").generated_text == answer_of("a", "hello")


def test_generate_details_tokens_typed(client: Client) -> None:
    details = client.generate("hello", task_id="a", max_new_tokens=2, details=True).details
    assert details is not None and details.tokens is not None
    assert [(t.id, t.text) for t in details.tokens] == [(ord("a"), "a"), (ord(":"), ":")]


def test_generate_ensemble_members(client: Client, engine: FakeEngine) -> None:
    response = client.generate("hello", task_ids=["a", "b", "b"], ensemble="vote")
    assert response.details is not None and response.details.members is not None
    assert [m.task_id for m in response.details.members] == ["a", "b", "b"]
    assert engine.requests[-1].task_ids == ("a", "b", "b")


def test_generate_unknown_parameter_type_error(client: Client) -> None:
    with pytest.raises(TypeError, match="max_tokens"):
        client.generate("hello", max_tokens=3)


def test_generate_stream_typed_events(client: Client) -> None:
    events = list(client.generate_stream("hi", task_id="a", max_new_tokens=3))
    assert [event.token.text for event in events if event.token] == list("a:i")
    assert events[-1].is_final and events[-1].generated_text == "a:i"
    assert events[-1].details is not None and events[-1].details.finish_reason == "length"


def test_generate_stream_error_before_first_event_raises(client: Client) -> None:
    with pytest.raises(NotFoundError):
        list(client.generate_stream("hi", task_id="nope"))


def test_generate_stream_error_midway_raises(client: Client, engine: FakeEngine) -> None:
    engine.fail_after_tokens = 1
    events = []
    with pytest.raises(UnavailableError, match="simulated"):
        events.extend(client.generate_stream("hi", task_id="a"))
    assert [event.token.text for event in events if event.token] == ["a"]


def test_not_found_error_for_unknown_ensemble_member(client: Client) -> None:
    with pytest.raises(NotFoundError) as error:
        client.generate("hi", task_ids=["a", "zzz"])
    assert (error.value.status, error.value.error_type) == (404, "not_found")


def test_validation_error_carries_server_message(client: Client) -> None:
    with pytest.raises(ValidationError, match=r"parameters\.max_new_tokens"):
        client.generate("hi", max_new_tokens=0)


def test_unauthorized_error_without_token(anonymous: Client, adapter_dir: Path) -> None:
    with pytest.raises(UnauthorizedError):
        anonymous.register_task("x", adapter_dir)


def test_too_large_error_for_long_input(client: Client, engine: FakeEngine) -> None:
    with pytest.raises(TooLargeError):
        client.generate("x" * (engine.max_input_chars + 1))


def test_overloaded_error_has_retry_after(client: Client, engine: FakeEngine) -> None:
    engine.queue_full = True
    with pytest.raises(OverloadedError) as error:
        client.generate("hi")
    assert error.value.retry_after == 3.0


def test_unavailable_error_when_not_ready(client: Client, engine: FakeEngine) -> None:
    engine.ready = False
    with pytest.raises(UnavailableError):
        client.health()


def test_internal_error_when_engine_crashes(client: Client, engine: FakeEngine) -> None:
    engine.crash_with = RuntimeError("boom")
    with pytest.raises(InternalError):
        client.generate("hi")


@pytest.mark.parametrize("task_id", [".", ".."])
def test_dot_task_id_validation_error_from_server_not_another_route(client: Client, task_id: str) -> None:
    with pytest.raises(ValidationError, match=f'found "{task_id}"'):  # not the task list, nor a 404 for /v1
        client.get_task(task_id)
    with pytest.raises(ValidationError, match=f'found "{task_id}"'):
        client.delete_task(task_id)


# ---- classify, score and label names, against a stand-in server (the app's routes land separately)

SEQUENCE_PREDICTION = [{"label": "pos", "score": 0.75}, {"label": "neg", "score": 0.25}]
TOKEN_PREDICTION = [
    {"token": "Ada", "start": 0, "end": 3, "label": "B-PER", "score": 0.9},
    {"token": "runs", "start": 4, "end": 8, "label": "O", "score": 0.6},
]
SCORES = {
    "scores": [
        {"candidate": "no", "logprob": -3.0, "mean_logprob": -3.0, "num_tokens": 1},
        {"candidate": "yes", "logprob": -0.5, "mean_logprob": -0.25, "num_tokens": 2},
    ],
    "best": "yes",
}


def test_classify_posts_body_and_parses_labels(canned_client: Client, canned: CannedServer) -> None:
    canned.answer({"predictions": [SEQUENCE_PREDICTION]})
    response = canned_client.classify("great film", "sentiment", top_k=2)
    assert canned.requests[-1].url.path == "/v1/classify"
    assert canned.last_body == {"inputs": "great film", "task_id": "sentiment", "parameters": {"top_k": 2}}
    assert response.predictions == [[LabelScore(label="pos", score=0.75), LabelScore(label="neg", score=0.25)]]


def test_classify_batch_ensemble_token_predictions(canned_client: Client, canned: CannedServer) -> None:
    canned.answer({"predictions": [TOKEN_PREDICTION, []]})
    response = canned_client.classify(["Ada runs", ""], task_ids=["ner-a", "ner-b"], ensemble="mean")
    assert canned.last_body == {
        "inputs": ["Ada runs", ""],
        "task_id": None,
        "task_ids": ["ner-a", "ner-b"],
        "ensemble": "mean",
        "parameters": {"top_k": None},
    }
    assert response.predictions == [[TokenLabel.model_validate(entry) for entry in TOKEN_PREDICTION], []]


def test_classify_wrong_task_kind_validation_error(canned_client: Client, canned: CannedServer) -> None:
    error = "task_id: expected a SEQ_CLS or TOKEN_CLS task; found 'chat' (CAUSAL_LM)"
    canned.answer({"error": error, "error_type": "validation"}, status=400)
    with pytest.raises(ValidationError, match=r"found 'chat' \(CAUSAL_LM\)") as raised:
        canned_client.classify("hi", "chat")
    assert raised.value.status == 400


def test_classify_unknown_task_not_found_error(canned_client: Client, canned: CannedServer) -> None:
    canned.answer({"error": "task 'nope' is not registered", "error_type": "not_found"}, status=404)
    with pytest.raises(NotFoundError, match="'nope' is not registered"):
        canned_client.classify("hi", "nope")


def test_score_posts_body_and_parses_scores(canned_client: Client, canned: CannedServer) -> None:
    canned.answer(SCORES)
    response = canned_client.score("Is it good?", ["no", "yes"], "qa")
    assert canned.requests[-1].url.path == "/v1/score"
    assert canned.last_body == {"inputs": "Is it good?", "candidates": ["no", "yes"], "task_id": "qa"}
    assert response.best == "yes"
    assert response.scores[1] == CandidateScore(candidate="yes", logprob=-0.5, mean_logprob=-0.25, num_tokens=2)


def test_score_ensemble_body(canned_client: Client, canned: CannedServer) -> None:
    canned.answer(SCORES)
    canned_client.score("q", ["no", "yes"], task_ids=["a", "b"])
    assert canned.last_body["task_ids"] == ["a", "b"]


def test_score_overloaded_error_has_retry_after(canned_client: Client, canned: CannedServer) -> None:
    canned.answer({"error": "queue full", "error_type": "overloaded"}, status=429, headers={"Retry-After": "2"})
    with pytest.raises(OverloadedError) as raised:
        canned_client.score("q", ["a"], "qa")
    assert raised.value.retry_after == 2.0


def test_register_task_sends_labels_file_part(canned_client: Client, canned: CannedServer, adapter_dir: Path) -> None:
    canned.answer({**TASK_RECORD, "task_type": "SEQ_CLS", "labels": ["neg", "pos"]}, status=201)
    record = canned_client.register_task("sentiment", adapter_dir, labels=["neg", "pos"])
    parts = canned.last_parts
    assert sorted(parts) == ["adapter_config", "adapter_model", "labels"]
    assert (parts["labels"].filename, parts["labels"].content_type) == ("labels.json", "application/json")
    assert json.loads(parts["labels"].content) == ["neg", "pos"]
    assert (record.task_type, record.labels) == ("SEQ_CLS", ["neg", "pos"])


def test_register_task_sends_labels_of_config_id2label(
    canned_client: Client, canned: CannedServer, adapter_dir: Path
) -> None:
    (adapter_dir / "config.json").write_text(json.dumps({"id2label": {"1": "pos", "0": "neg"}}))
    canned.answer(TASK_RECORD, status=201)
    canned_client.register_task("sentiment", adapter_dir)
    assert json.loads(canned.last_parts["labels"].content) == ["neg", "pos"]


def test_register_task_without_labels_sends_two_parts(
    canned_client: Client, canned: CannedServer, adapter_dir: Path
) -> None:
    canned.answer(TASK_RECORD, status=201)
    canned_client.register_task("sentiment", adapter_dir)
    assert sorted(canned.last_parts) == ["adapter_config", "adapter_model"]


def test_register_task_malformed_id2label_value_error_before_sending(
    canned_client: Client, canned: CannedServer, adapter_dir: Path
) -> None:
    (adapter_dir / "config.json").write_text(json.dumps({"id2label": {"0": "neg", "2": "pos"}}))
    with pytest.raises(ValueError, match=r"expected the ids \['0', '1'\]"):
        canned_client.register_task("sentiment", adapter_dir)
    assert canned.requests == []
