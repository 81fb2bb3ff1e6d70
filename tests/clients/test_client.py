"""The blocking `Client` against the app: every method, typed answers, typed errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptserve_client import (
    Client,
    InternalError,
    NotFoundError,
    OverloadedError,
    TooLargeError,
    UnauthorizedError,
    UnavailableError,
    ValidationError,
)
from tests.api.fake_engine import FakeEngine, answer_of


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
