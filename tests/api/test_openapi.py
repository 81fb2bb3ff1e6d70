"""GET /openapi.json tells the truth: every status an operation sends with the real error body, references that
resolve, the stream's events, the one-target rule; and a 405 names every method the path serves."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.openapi import OPERATION_ERRORS
from tests.api.conftest import upload


@pytest.fixture
def document(client: TestClient) -> dict[str, Any]:
    return client.get("/openapi.json").json()


def test_every_operation_documents_its_error_statuses_with_the_real_error_body(document: dict[str, Any]) -> None:
    for (method, path), statuses in OPERATION_ERRORS.items():
        responses = document["paths"][path][method]["responses"]
        for status in (*statuses, 500):
            schema = responses[str(status)]["content"]["application/json"]["schema"]
            body = (
                "OpenAIErrorResponse"
                if path.startswith(("/v1/models", "/v1/completions", "/v1/chat", "/tokenize", "/detokenize"))
                else "ErrorResponse"
            )
            assert schema == {"$ref": f"#/components/schemas/{body}"}, (method, path, status)
        if body == "OpenAIErrorResponse":
            assert "422" not in responses, (method, path)  # OpenAI answers invalid requests with 400
    error = document["components"]["schemas"]["ErrorResponse"]
    assert (
        error["required"] == ["error", "error_type"]
        and "method_not_allowed" in error["properties"]["error_type"]["enum"]
    )
    assert "HTTPValidationError" not in document["components"]["schemas"]  # FastAPI's {"detail": ...} is not sent


def test_every_operation_in_the_document_is_in_the_error_table(document: dict[str, Any]) -> None:
    documented = {(method, path) for path, operations in document["paths"].items() for method in operations}
    assert documented == set(OPERATION_ERRORS)


def test_every_reference_resolves_from_the_document_root(document: dict[str, Any]) -> None:
    references = set(re.findall(r'"\$ref": "([^"]+)"', json.dumps(document)))
    assert references and all(ref.startswith("#/components/schemas/") for ref in references)
    assert {ref.rsplit("/", 1)[1] for ref in references} <= set(document["components"]["schemas"])


def test_the_stream_is_documented_as_server_sent_events_of_stream_events_or_errors(document: dict[str, Any]) -> None:
    content = document["paths"]["/v1/generate_stream"]["post"]["responses"]["200"]["content"]
    data = content["text/event-stream"]["schema"]["properties"]["data"]
    assert data["contentMediaType"] == "application/json"
    assert data["contentSchema"]["anyOf"] == [
        {"$ref": "#/components/schemas/StreamEvent"},
        {"$ref": "#/components/schemas/ErrorResponse"},
    ]


def test_task_id_and_task_ids_exclude_each_other_in_the_schema(document: dict[str, Any], client: TestClient) -> None:
    rule = document["components"]["schemas"]["GenerateRequest"]["not"]
    assert rule["required"] == ["task_id", "task_ids"]
    assert rule["properties"] == {"task_id": {"type": "string"}, "task_ids": {"type": "array"}}
    both = client.post("/v1/generate", json={"inputs": "x", "task_id": "a", "task_ids": ["a"]})
    assert both.status_code == 422
    assert client.post("/v1/generate", json={"inputs": "x", "task_id": None, "task_ids": None}).status_code == 200


def test_the_schema_states_the_servers_own_limits(client: TestClient, document: dict[str, Any]) -> None:
    max_new_tokens = document["components"]["schemas"]["Parameters"]["properties"]["max_new_tokens"]["anyOf"][0]
    assert max_new_tokens == {"type": "integer", "minimum": 1, "maximum": 2048}
    task_ids = document["components"]["schemas"]["GenerateRequest"]["properties"]["task_ids"]["anyOf"][0]
    assert task_ids["maxItems"] == 32  # an ensemble's members run together: the batch's rows
    completion = document["components"]["schemas"]["CompletionRequest"]["properties"]
    prompt_lists = [o for o in completion["prompt"]["anyOf"] if o.get("type") == "array" and "maxItems" in o]
    assert completion["n"]["anyOf"][0]["maximum"] == 1024  # choices queue for rows: max_waiting
    assert {o["maxItems"] for o in prompt_lists} == {1024}


def test_an_integral_float_is_an_integer_as_json_schema_says(client: TestClient) -> None:
    parameters = {"max_new_tokens": 3.0, "seed": 7.0, "top_k": 2.0}
    assert client.post("/v1/generate", json={"inputs": "x", "parameters": parameters}).status_code == 200
    fractional = client.post("/v1/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 3.5}})
    assert fractional.status_code == 422


def test_405_names_every_method_the_path_serves(client: TestClient) -> None:
    response = client.post("/v1/tasks/upper")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, PUT, DELETE"
    assert response.json() == {
        "error": "expected GET or PUT or DELETE for /v1/tasks/upper; found POST",
        "error_type": "method_not_allowed",
    }


def test_an_upload_with_an_extra_part_is_422_naming_it(client: TestClient) -> None:
    extra = client.put("/v1/tasks/a", files=upload(), data={"comment": "hi"})
    assert extra.status_code == 422 and "found also ['comment']" in extra.json()["error"]


def test_the_model_path_names_the_served_backbone_as_its_example(document: dict[str, Any]) -> None:
    [parameter] = document["paths"]["/v1/models/{model}"]["get"]["parameters"]
    assert parameter["example"] == "fake/tiny"


def test_token_ids_are_bounded_by_the_backbone_vocabulary(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert schemas["DetokenizeRequest"]["properties"]["tokens"]["items"] == {"type": "integer", "minimum": 0,
                                                                              "maximum": 258}  # fmt: skip
    ids = [o for o in schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"] if o.get("type") == "array"]
    bounds = [o["items"].get("maximum", o["items"].get("items", {}).get("maximum")) for o in ids]
    assert bounds == [None, 258, 258]  # a list of strings, token ids, lists of token ids


def test_an_ensemble_on_the_openai_routes_is_named_on_the_backbone(document: dict[str, Any]) -> None:
    for request in ("CompletionRequest", "ChatRequest"):
        rules = document["components"]["schemas"][request]["allOf"]
        assert {"properties": {"model": {"const": "fake/tiny"}}} in [rule.get("then") for rule in rules]


def test_optional_openai_fields_admit_null(document: dict[str, Any]) -> None:
    """A null means the default on these bodies, so the schema must not call it invalid."""
    properties = document["components"]["schemas"]["CompletionRequest"]["properties"]
    for name in ("echo", "add_special_tokens", "ignore_eos", "min_tokens", "n"):
        assert {"type": "null"} in properties[name]["anyOf"], name
    assert "anyOf" not in properties["model"]


def test_chat_response_format_accepts_only_text(client: TestClient) -> None:
    base = {"model": "upper", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=base | {"response_format": {}}).status_code == 400
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ResponseFormat"]
    assert schema["properties"]["type"] == {"const": "text", "title": "Type", "type": "string"}


def test_a_backbone_without_its_own_head_asks_classify_for_a_task(document: dict[str, Any]) -> None:
    [rule] = document["components"]["schemas"]["ClassifyRequest"]["allOf"]
    assert [option["required"] for option in rule["anyOf"]] == [["task_id"], ["task_ids"]]
