"""POST /v1/generate: answers, details, ensembles, parameter validation and every engine error."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.settings import Settings
from server.engine.types import EnsembleMode, SamplingParams
from tests.api.fake_engine import FakeEngine, answer_of


@pytest.fixture(autouse=True)
def tasks(engine: FakeEngine) -> None:
    for task_id in ("a", "b", "c"):
        engine.add_task(task_id)


def generate(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/generate", json={"inputs": "hello", **body})


def test_generate_returns_text_without_details_by_default(client: TestClient) -> None:
    response = generate(client, task_id="a")
    assert response.status_code == 200
    assert response.json() == {"generated_text": answer_of("a", "hello")}


def test_generate_uses_bare_backbone_when_no_task(client: TestClient, engine: FakeEngine) -> None:
    assert generate(client).json()["generated_text"] == answer_of(None, "hello")
    assert engine.requests[-1].task_ids == (None,)


def test_generate_details_with_tokens_when_requested(client: TestClient) -> None:
    details = generate(client, task_id="a", parameters={"details": True, "max_new_tokens": 3}).json()["details"]
    assert details["finish_reason"] == "length"
    assert (details["generated_tokens"], details["input_tokens"]) == (3, 6)
    assert (details["task_id"], details["task_version"]) == ("a", 1)
    assert details["tokens"] == [{"id": ord(c), "text": c, "logprob": -0.5} for c in "a:o"]
    assert "members" not in details


def test_generate_eos_finish_reason_when_answer_ends(client: TestClient) -> None:
    details = generate(client, task_id="a", parameters={"details": True}).json()["details"]
    assert details["finish_reason"] == "eos_token"


def test_generate_ensemble_vote_has_members_without_tokens(client: TestClient, engine: FakeEngine) -> None:
    body = generate(client, task_ids=["a", "b", "b"]).json()
    assert body["generated_text"] == answer_of("b", "hello")
    assert [m["task_id"] for m in body["details"]["members"]] == ["a", "b", "b"]
    assert "tokens" not in body["details"]
    assert engine.requests[-1].ensemble is EnsembleMode.VOTE


def test_generate_ensemble_mean_reports_no_single_task(client: TestClient, engine: FakeEngine) -> None:
    details = generate(client, task_ids=["a", "b"], ensemble="mean").json()["details"]
    assert (details["task_id"], details["task_version"]) == (None, None)
    assert engine.requests[-1].ensemble is EnsembleMode.MEAN


def test_generate_passes_sampling_parameters(client: TestClient, engine: FakeEngine) -> None:
    parameters = {"max_new_tokens": 5, "do_sample": True, "temperature": 0.7, "top_k": 40, "top_p": 0.9,
                  "seed": 11, "stop": ["\n"]}  # fmt: skip
    generate(client, task_id="a", parameters=parameters)
    assert engine.requests[-1].sampling == SamplingParams(5, True, 0.7, 40, 0.9, 11, ("\n",))


def test_generate_null_parameters_take_defaults(client: TestClient, engine: FakeEngine) -> None:
    nulls = {"temperature": None, "top_k": None, "top_p": None, "seed": None, "stop": None, "watermark": False}
    assert generate(client, parameters=nulls).status_code == 200  # as TGI clients send them
    assert engine.requests[-1].sampling == SamplingParams()


def test_generate_greedy_accepts_temperature_zero(client: TestClient, engine: FakeEngine) -> None:
    assert generate(client, parameters={"temperature": 0}).status_code == 200
    assert engine.requests[-1].sampling.temperature == 1.0


def test_generate_404_when_task_unknown(client: TestClient) -> None:
    response = generate(client, task_id="nope")
    assert response.status_code == 404
    assert response.json() == {"error": "task 'nope' is not registered", "error_type": "not_found"}


def test_generate_404_when_ensemble_member_unknown(client: TestClient) -> None:
    response = generate(client, task_ids=["a", "nope", "b"])
    assert response.status_code == 404
    assert "nope" in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "field", "found"),
    [
        ({"parameters": {"max_new_tokens": 0}}, "parameters.max_new_tokens", "found 0"),
        ({"parameters": {"max_new_tokens": "many"}}, "parameters.max_new_tokens", 'found "many"'),
        ({"parameters": {"do_sample": True, "temperature": 0}}, "parameters.temperature", "found 0"),
        ({"parameters": {"temperature": -1}}, "parameters.temperature", "found -1"),
        ({"parameters": {"top_p": 0}}, "parameters.top_p", "found 0"),
        ({"parameters": {"top_p": 1.5}}, "parameters.top_p", "found 1.5"),
        ({"parameters": {"top_k": -1}}, "parameters.top_k", "found -1"),
        ({"parameters": {"stop": [""]}}, "parameters.stop.0", 'found ""'),
        ({"task_id": "bad id"}, "task_id", 'found "bad id"'),
        ({"task_ids": ["ok", "-bad"]}, "task_ids.1", 'found "-bad"'),
        ({"task_ids": []}, "task_ids", "found []"),
        ({"task_id": "a", "task_ids": ["b"]}, "task_id", "found task_id='a'"),
        ({"ensemble": "max", "task_ids": ["a"]}, "ensemble", 'found "max"'),
        ({"inputs": None}, "inputs", "found null"),
        ({"parameters": {"max_new_tokens": "5"}}, "parameters.max_new_tokens", 'found "5"'),
        ({"parameters": {"max_new_tokens": True}}, "parameters.max_new_tokens", "found true"),
        ({"parameters": {"do_sample": "yes"}}, "parameters.do_sample", 'found "yes"'),
        ({"parameters": {"seed": "1"}}, "parameters.seed", 'found "1"'),
        ({"inputs": 5}, "inputs", "found 5"),
    ],
)
def test_generate_422_naming_field_expected_and_found(client: TestClient, body: dict, field: str, found: str) -> None:
    response = generate(client, **body)
    assert response.status_code == 422
    message = response.json()["error"]
    assert response.json()["error_type"] == "validation"
    assert field in message and "expected" in message and found in message


def test_generate_422_when_inputs_missing(client: TestClient) -> None:
    response = client.post("/v1/generate", json={"task_id": "a"})
    assert response.status_code == 422
    assert response.json()["error"].startswith("inputs: expected a value; found none")


def test_generate_400_when_body_not_json(client: TestClient) -> None:
    response = client.post("/v1/generate", content=b"{oops", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error_type"] == "validation"
    assert "JSON" in response.json()["error"]


def test_generate_400_naming_the_byte_when_body_not_utf8(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/v1/generate", content=b'{"inputs": "\xff"}', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {
        "error": "body: expected JSON text encoded as UTF-8; found byte 0xff at offset 12, which is not utf-8",
        "error_type": "validation",
    }
    assert engine.requests == []


def test_generate_400_when_json_nested_too_deep(client: TestClient) -> None:
    response = client.post("/v1/generate", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "nesting deeper than the parser's recursion limit" in response.json()["error"]


def test_generate_422_naming_content_type_when_body_not_json(client: TestClient) -> None:
    response = client.post("/v1/generate", content=b'{"inputs": "x"}', headers={"content-type": "text/plain"})
    assert response.status_code == 422
    assert response.json()["error"] == (
        "body: expected a JSON object sent with Content-Type application/json; found Content-Type 'text/plain'"
    )


def test_generate_422_when_inputs_hold_a_lone_surrogate(client: TestClient, engine: FakeEngine) -> None:
    body = b'{"inputs": "ab\\ud800", "task_id": "a"}'  # valid JSON, but no UTF-8 text: tokenizers raise on it
    response = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"].startswith("inputs: expected valid Unicode text; found a lone surrogate")
    assert engine.requests == []
    assert generate(client, inputs="ab\U0001f600").status_code == 200  # a surrogate pair is one emoji: fine


@pytest.mark.parametrize(
    ("parameters", "found"),
    [
        (b'{"seed": 18446744073709551616}', "found 18446744073709551616"),  # torch.Generator overflows past 2**64-1
        (b'{"seed": 9007199254740992}', "found 9007199254740992"),  # 2**53: not every JSON library reads it exactly
        (b'{"do_sample": true, "temperature": 1e-300}', "found 1e-300"),  # logits / it overflow: NaN probabilities
        (b'{"do_sample": true, "temperature": Infinity}', "expected a finite number; found Infinity"),
        (b'{"do_sample": true, "top_p": NaN}', "expected a finite number; found NaN"),
    ],
)
def test_generate_422_when_sampling_parameter_would_break_the_sampler(
    client: TestClient, engine: FakeEngine, parameters: bytes, found: str
) -> None:
    body = b'{"inputs": "x", "parameters": ' + parameters + b"}"
    response = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"].startswith("parameters.") and found in response.json()["error"]
    assert engine.requests == []


def test_generate_accepts_the_extreme_sampling_parameters_that_work(client: TestClient, engine: FakeEngine) -> None:
    parameters = {"do_sample": True, "temperature": 1e-5, "top_p": 1e-300, "seed": 2**53 - 1}
    assert generate(client, parameters=parameters).status_code == 200
    sampling = engine.requests[-1].sampling
    assert (sampling.temperature, sampling.seed, sampling.top_p) == (1e-5, 2**53 - 1, 1e-300)  # float64 all through


def test_generate_422_when_engine_rejects_parameters(client: TestClient, engine: FakeEngine) -> None:
    response = generate(client, parameters={"max_new_tokens": engine.max_new_tokens_limit + 1})
    assert response.status_code == 422
    assert "max_new_tokens" in response.json()["error"]


def test_generate_413_when_input_too_long(client: TestClient, engine: FakeEngine) -> None:
    response = client.post("/v1/generate", json={"inputs": "x" * (engine.max_input_chars + 1)})
    assert response.status_code == 413
    assert response.json()["error_type"] == "too_large"


def test_generate_413_when_body_over_request_limit(engine: FakeEngine) -> None:
    with TestClient(create_app(Settings(demo_tasks=False, max_request_bytes=1000), engine)) as client:
        response = client.post("/v1/generate", json={"inputs": "x" * 2000})
    assert response.status_code == 413
    assert engine.requests == []


def test_generate_429_with_retry_after_when_queue_full(client: TestClient, engine: FakeEngine) -> None:
    engine.queue_full = True
    response = generate(client)
    assert response.status_code == 429
    assert response.json()["error_type"] == "overloaded"
    assert response.headers["retry-after"] == "3"  # the engine's 2.5 s, rounded up


def test_generate_503_when_engine_not_ready(client: TestClient, engine: FakeEngine) -> None:
    engine.ready = False
    response = generate(client)
    assert response.status_code == 503
    assert response.json()["error_type"] == "unavailable"


def test_generate_500_generic_when_engine_crashes(client: TestClient, engine: FakeEngine) -> None:
    engine.crash_with = RuntimeError("CUDA secret details")
    response = generate(client)
    assert response.status_code == 500
    assert response.json()["error_type"] == "internal"
    assert "secret" not in response.json()["error"]


def test_generate_closes_engine_iterator_when_done(client: TestClient, engine: FakeEngine) -> None:
    generate(client, task_id="a")
    assert (len(engine.completed), engine.aborted) == (1, [])
