"""The one mapping from exceptions to HTTP statuses and error types."""

from __future__ import annotations

import pytest

from prompt_store.errors import LookupThrottled, StoreUnavailable
from server.api.errors import describe_one, to_api_error
from server.engine.errors import (
    EngineUnavailable,
    GenerationFailed,
    InputTooLong,
    InvalidPrompt,
    InvalidTask,
    QueueFull,
    TaskNotFound,
    TaskTooLarge,
    UnknownToken,
    WrongKind,
)


@pytest.mark.parametrize(
    ("exc", "status", "error_type"),
    [
        (InvalidTask("bad adapter"), 422, "validation"),
        (InvalidPrompt("bad prompt"), 422, "validation"),
        (TaskTooLarge("too many bytes"), 413, "too_large"),
        (InputTooLong("too many tokens"), 413, "too_large"),
        (TaskNotFound("x"), 404, "not_found"),
        (QueueFull(10, retry_after=0.2), 429, "overloaded"),
        (EngineUnavailable("stopping"), 503, "unavailable"),
        (StoreUnavailable("s3://b/p: endpoint unreachable"), 503, "unavailable"),
        (LookupThrottled("task 'x' is not known here; retry"), 503, "unavailable"),
        (WrongKind("a SEQ_CLS task on /v1/generate"), 400, "validation"),
        (UnknownToken("inputs: found token 259 ('<extra>')"), 400, "validation"),
        (RuntimeError("boom"), 500, "internal"),
        (GenerationFailed("NaN logits"), 500, "internal"),
    ],
)
def test_error_maps_to_status_and_type(exc: Exception, status: int, error_type: str) -> None:
    error = to_api_error(exc)
    assert (error.status, error.error_type) == (status, error_type)


def test_error_retry_after_at_least_one_second() -> None:
    assert to_api_error(QueueFull(10, retry_after=0.2)).headers["Retry-After"] == "1"


def test_a_throttled_lookup_says_retry_at_once() -> None:
    assert to_api_error(LookupThrottled("task 'x' is not known here; retry")).headers["Retry-After"] == "1"


def test_an_engine_that_stopped_says_when_to_retry() -> None:
    """Every 503 carries Retry-After, as the OpenAPI document says (a replica may answer meanwhile)."""
    error = to_api_error(EngineUnavailable("the engine step failed"))
    assert error.headers["Retry-After"] == "5" and error.message == "the engine step failed"


def test_error_unknown_logged_with_generic_message(caplog: pytest.LogCaptureFixture) -> None:
    error = to_api_error(RuntimeError("secret path /home/x"))
    assert "secret" not in error.message
    assert "secret path" in caplog.text


def test_validation_message_names_field_expected_found() -> None:
    error = {"type": "greater_than_equal", "loc": ("body", "parameters", "top_k"), "msg": "Input should be "
             "greater than or equal to 0", "input": -3, "ctx": {"ge": 0}}  # fmt: skip
    assert describe_one(error) == "parameters.top_k: expected greater than or equal to 0; found -3"


def test_generation_failure_keeps_its_message() -> None:
    """Unlike an unexpected exception, it says what went wrong (which task overflowed)."""
    assert to_api_error(GenerationFailed("expected finite logits; found NaN")).message == (
        "expected finite logits; found NaN"
    )
