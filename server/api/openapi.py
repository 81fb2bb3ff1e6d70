"""The OpenAPI document as the server really behaves: every status an operation can send, with the real error body
(`ErrorResponse`, not FastAPI's `{"detail": ...}`), the stream's event schema, and references that resolve.

FastAPI documents only what a route declares; the errors come from one mapping (errors.py), so this module adds
them here, per operation, from the dependencies each route has.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.api.auth import OPEN_PATHS
from server.api.errors import is_openai_path
from server.api.openai_schemas import ChatChunk, CompletionResponse, OpenAIErrorResponse
from server.api.schemas import ErrorResponse, StreamEvent
from server.api.settings import Settings
from server.api.state import served_model_name

COMPONENT = "#/components/schemas/{model}"
ERROR_REF = {"$ref": COMPONENT.format(model="ErrorResponse")}
OPENAI_ERROR_REF = {"$ref": COMPONENT.format(model="OpenAIErrorResponse")}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
FASTAPI_VALIDATION = ("HTTPValidationError", "ValidationError")
# One server-sent event (as tools read an event stream: its fields), its data a JSON StreamEvent or ErrorResponse.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [{"$ref": COMPONENT.format(model="StreamEvent")}, ERROR_REF]},
        },
        "event": {"type": "string"},
    },
}


def openai_sse_event(chunk: str) -> dict[str, Any]:
    """An OpenAI stream's event: a JSON chunk, an error, or the closing `[DONE]`."""
    data = {"anyOf": [{"$ref": COMPONENT.format(model=chunk)}, OPENAI_ERROR_REF, {"const": "[DONE]"}]}
    return {"type": "object", "required": ["data"], "properties": {"data": {"type": "string", "contentSchema": data}}}


OPENAI_STREAMS = {"/v1/completions": "CompletionResponse", "/v1/chat/completions": "ChatChunk"}
ERROR_STATUSES: dict[int, tuple[str, dict[str, Any]]] = {  # status -> (description, headers)
    400: (
        "the body is not JSON (or not UTF-8), or a multipart body the parser refuses; or a task or backbone of another "
        "kind than the route serves (a classification task on /v1/generate, a generation task on /v1/classify); or "
        "an input token the model's embedding table has no row for",
        {},
    ),
    401: (
        "the server has API keys (API_KEY) and the request carries none of them, or, on a task write, the server has "
        "an admin token and the request does not carry it",
        {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    ),
    404: ("the task (or the model, on the OpenAI routes) does not exist", {}),
    408: (
        "the request's headers or body stopped arriving (HEADER_TIMEOUT_S, BODY_TIMEOUT_S); the connection closes",
        {},
    ),
    409: ("the task id is the served backbone's name", {}),
    413: ("the body, or the input's tokens, exceed the server's limits", {}),
    422: ("a field is missing, of the wrong type or out of range; or the adapter does not fit the backbone", {}),
    429: ("the waiting queue is full", RETRY_AFTER),
    500: ("an internal error, or a request whose task drives the model to NaN or infinity", {}),
    503: ("the model is still loading, or the engine stopped", RETRY_AFTER),
}

# Which statuses each operation can send, beyond its successes (500 on every one).
OPERATION_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("get", "/health"): (503,),
    ("get", "/health/generate"): (503,),
    ("get", "/info"): (503,),
    ("get", "/metrics"): (),
    ("get", "/v1/tasks"): (503,),
    ("get", "/v1/tasks/{task_id}"): (404, 422, 503),
    ("put", "/v1/tasks/{task_id}"): (400, 401, 408, 409, 413, 422, 503),
    ("delete", "/v1/tasks/{task_id}"): (401, 404, 422, 503),
    ("post", "/v1/generate"): (400, 404, 408, 413, 422, 429, 503),
    ("post", "/v1/generate_stream"): (400, 404, 408, 413, 422, 429, 503),
    ("post", "/v1/classify"): (400, 404, 408, 413, 422, 429, 503),
    ("post", "/v1/score"): (400, 404, 408, 413, 422, 429, 503),
    ("get", "/v1/models"): (503,),
    ("get", "/v1/models/{model}"): (404, 503),
    ("post", "/v1/completions"): (400, 404, 408, 413, 429, 503),  # OpenAI says 400 where the native routes say 422
    ("post", "/v1/chat/completions"): (400, 404, 408, 413, 429, 503),
    ("post", "/tokenize"): (400, 404, 408, 413, 503),  # vLLM's tokenizer routes, errors in OpenAI's shape as vLLM's
    ("post", "/detokenize"): (400, 404, 408, 413, 503),
    ("get", "/tokenizer_info"): (503,),
}
# with API keys set, every route but the open ones answers 401 to a request without one
OPERATION_ERRORS = {
    (method, path): statuses if path in OPEN_PATHS else tuple(sorted({*statuses, 401}))
    for (method, path), statuses in OPERATION_ERRORS.items()
}


def install_openapi(app: FastAPI, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        """Kept once the engine is up: the document then states the served backbone's own rules too."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build_openapi(app, settings)
        engine = app.state.promptserve.engine
        if engine is not None:
            backbone, info = served_model_name(settings, engine), engine.info()
            state_backbone(document["components"]["schemas"], info.vocab_size, backbone)
            if not info.has_own_head:
                name_a_classifier(document["components"]["schemas"]["ClassifyRequest"])
            name_a_model(document, backbone)
            app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the document


def build_openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    document = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in FASTAPI_VALIDATION:
        schemas.pop(name, None)
    for model in (ErrorResponse, StreamEvent, OpenAIErrorResponse, CompletionResponse, ChatChunk):
        add_component(schemas, model)
    state_limits(schemas, settings)
    for name in NULLS_ARE_DEFAULTS:
        nullable_optional_fields(schemas[name])
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            error_ref = OPENAI_ERROR_REF if is_openai_path(path) else ERROR_REF
            document_errors(operation, OPERATION_ERRORS.get((method, path), ()), error_ref)
    document_openai_streams(document)
    stream = document["paths"]["/v1/generate_stream"]["post"]["responses"]["200"]
    stream["content"] = {"text/event-stream": {"schema": copy.deepcopy(SSE_EVENT)}}
    stream["description"] = (
        "server-sent events, each `data: <StreamEvent>`; the last carries generated_text and details. An error "
        "after the stream has started arrives as a last `data: <ErrorResponse>`"
    )
    return document


def document_openai_streams(document: dict[str, Any]) -> None:
    """With `stream: true` the OpenAI routes answer with data-only server-sent events."""
    for path, chunk in OPENAI_STREAMS.items():
        ok = document["paths"][path]["post"]["responses"]["200"]
        ok["content"]["text/event-stream"] = {"schema": openai_sse_event(chunk)}
        ok["description"] = (
            f"JSON, or with `stream: true` server-sent events `data: <{chunk}>` ending with `data: [DONE]`; an error "
            "after the stream has started arrives as `data: <OpenAIErrorResponse>`"
        )


def state_limits(schemas: dict[str, Any], settings: Settings) -> None:
    """The server's own limits in the request schema, so that a request the schema allows is one it serves."""
    max_new_tokens = schemas["Parameters"]["properties"]["max_new_tokens"]
    max_new_tokens["anyOf"][0]["maximum"] = settings.engine.max_new_tokens_limit
    max_new_tokens["description"] = f"null or absent: {settings.default_max_new_tokens}"
    task_ids = schemas["GenerateRequest"]["properties"]["task_ids"]["anyOf"][0]
    task_ids["maxItems"] = settings.engine.max_batch_size
    for request in ("CompletionRequest", "ChatRequest"):
        properties = schemas[request]["properties"]
        properties["n"]["maximum"] = settings.engine.max_waiting  # choices queue for rows (check_choices)
        properties["task_ids"]["anyOf"][0]["maxItems"] = settings.engine.max_batch_size
        for name in ("max_tokens", "max_completion_tokens"):
            if name in properties:
                properties[name]["anyOf"][0]["maximum"] = settings.engine.max_new_tokens_limit
    for name in ("prompt", "prompt_embeds"):
        for option in schemas["CompletionRequest"]["properties"][name]["anyOf"]:
            if option.get("type") == "array" and option["items"].get("type") != "integer":  # a list of prompts
                option["maxItems"] = settings.engine.max_waiting


NULLS_ARE_DEFAULTS = ("CompletionRequest", "ChatRequest", "StreamOptions", "TokenizeRequest", "DetokenizeRequest")


def nullable_optional_fields(schema: dict[str, Any]) -> None:
    """OpenAI's (and vLLM's) fields are nullable: in these bodies a null means the default (nulls_are_defaults), so
    every optional field's schema admits null."""
    required = set(schema.get("required", ()))
    for name, prop in schema["properties"].items():
        options = prop.get("anyOf", [prop])
        if name in required or any(option.get("type") == "null" for option in options):
            continue
        kept = {key: prop.pop(key) for key in ("title", "description", "default") if key in prop}
        schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **kept}


def state_backbone(schemas: dict[str, Any], vocab_size: int, backbone: str) -> None:
    """What only the served backbone decides, where JSON Schema can say it: token ids within its vocabulary, and an
    ensemble (`task_ids`) named on the backbone's own `model`."""
    bounded = {"minimum": 0, "maximum": vocab_size - 1}
    schemas["DetokenizeRequest"]["properties"]["tokens"]["items"].update(bounded)
    for option in schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]:
        items = option.get("items", {})
        if items.get("type") == "integer":
            items.update(bounded)
        elif items.get("items", {}).get("type") == "integer":
            items["items"].update(bounded)
    ensemble_on_backbone = {
        "if": {"required": ["task_ids"], "properties": {"task_ids": {"type": "array"}}},
        "then": {"properties": {"model": {"const": backbone}}},
    }
    for request in ("CompletionRequest", "ChatRequest"):
        schemas[request].setdefault("allOf", []).append(ensemble_on_backbone)


def name_a_classifier(schema: dict[str, Any]) -> None:
    """A backbone without a classification head of its own classifies only under a task: task_id or task_ids."""
    named = [{"required": [name], "properties": {name: {"not": {"type": "null"}}}} for name in ("task_id", "task_ids")]
    schema.setdefault("allOf", []).append({"anyOf": named})
    schema["description"] = "this backbone has no classification head of its own: name a task (task_id or task_ids)"


def name_a_model(document: dict[str, Any], backbone: str) -> None:
    """GET /v1/models/{model} answers 404 for any name but a served one's: without an example, a client generating
    names from the schema (schemathesis) only ever reaches the 404 ("missing test data")."""
    [parameter] = document["paths"]["/v1/models/{model}"]["get"]["parameters"]
    parameter["example"] = backbone


def add_component(schemas: dict[str, Any], model: type[Any]) -> None:
    """The model and every model it uses, as components that `#/components/schemas/...` references reach (FastAPI's
    own version of a model it already documents is kept)."""
    schema = model.model_json_schema(ref_template=COMPONENT)
    for name, definition in schema.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    schemas.setdefault(model.__name__, schema)


OPENAI_400 = "an invalid request: a field missing, of the wrong type, out of range or unsupported (`param` names it)"


def document_errors(operation: dict[str, Any], statuses: tuple[int, ...], error_ref: dict[str, str]) -> None:
    responses = operation.setdefault("responses", {})
    if 422 not in statuses:
        responses.pop("422", None)  # FastAPI's own (HTTPValidationError); the OpenAI routes answer 400 instead
    for status in (*statuses, 500):
        description, headers = ERROR_STATUSES[status]
        if status == 400 and error_ref == OPENAI_ERROR_REF:
            description = OPENAI_400
        content = {"application/json": {"schema": dict(error_ref)}}
        response: dict[str, Any] = {"description": description, "content": content}
        if headers:
            response["headers"] = copy.deepcopy(headers)
        responses[str(status)] = response
