"""The shared request/response module, without a server."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from promptserve_client import InternalError, OverloadedError, PromptserveError, UnavailableError, ValidationError
from promptserve_client._protocol import error_of, generate_call, parse_event, read_adapter, task_path


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
