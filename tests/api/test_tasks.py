"""PUT, GET, DELETE /v1/tasks/{task_id} and GET /v1/tasks against the fake engine."""

from __future__ import annotations

from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.settings import Settings
from tests.api.conftest import upload
from tests.api.fake_engine import FakeEngine, adapter_config

RECORD_FIELDS = {
    "task_id",
    "version",
    "method",
    "num_virtual_tokens",
    "bytes",
    "sha256",
    "created_at",
    "task_type",
    "labels",
    "rank",
}


def test_put_task_201_with_record_when_new(client: TestClient) -> None:
    response = client.put("/v1/tasks/sentiment", files=upload())
    assert response.status_code == 201
    record = response.json()
    assert set(record) == RECORD_FIELDS
    assert (record["task_id"], record["version"], record["method"]) == ("sentiment", 1, "prompt_tuning")


def test_put_task_200_with_next_version_when_replaced(client: TestClient) -> None:
    client.put("/v1/tasks/sentiment", files=upload())
    response = client.put("/v1/tasks/sentiment", files=upload(adapter_config("PREFIX_TUNING", 8)))
    assert response.status_code == 200
    assert (response.json()["version"], response.json()["method"]) == (2, "prefix_tuning")


def test_put_task_passes_both_parts_to_engine(client: TestClient, engine: FakeEngine) -> None:
    client.put("/v1/tasks/sentiment", files=upload(model=b"x" * 123))
    assert engine.tasks["sentiment"].bytes == len(adapter_config()) + 123


def test_get_task_returns_record(client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("sentiment")
    response = client.get("/v1/tasks/sentiment")
    assert response.status_code == 200
    assert response.json()["task_id"] == "sentiment"


def test_get_task_404_when_unknown(client: TestClient) -> None:
    response = client.get("/v1/tasks/nope")
    assert response.status_code == 404
    assert response.json() == {"error": "task 'nope' is not registered", "error_type": "not_found"}


def test_list_tasks_returns_every_record(client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("a")
    engine.add_task("b")
    response = client.get("/v1/tasks")
    assert [record["task_id"] for record in response.json()["tasks"]] == ["a", "b"]


def test_list_tasks_empty_when_none(client: TestClient) -> None:
    assert client.get("/v1/tasks").json() == {"tasks": []}


def test_delete_task_204_then_404(client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("a")
    response = client.delete("/v1/tasks/a")
    assert (response.status_code, response.content) == (204, b"")
    assert client.get("/v1/tasks/a").status_code == 404


def test_delete_task_404_when_unknown(client: TestClient) -> None:
    assert client.delete("/v1/tasks/nope").json()["error_type"] == "not_found"


def test_task_id_422_when_pattern_mismatch(client: TestClient) -> None:
    response = client.put("/v1/tasks/-bad", files=upload())
    assert response.status_code == 422
    assert "task_id" in response.json()["error"] and "-bad" in response.json()["error"]


def test_task_id_422_when_longer_than_128(client: TestClient) -> None:
    assert client.get("/v1/tasks/" + "a" * 129).status_code == 422


def test_put_task_422_naming_the_missing_part(client: TestClient) -> None:
    files = upload()
    del files["adapter_model"]
    response = client.put("/v1/tasks/a", files=files)
    assert response.status_code == 422
    assert "adapter_model" in response.json()["error"]
    assert response.json()["error_type"] == "validation"


def test_put_task_422_when_part_is_a_text_field(client: TestClient) -> None:
    files = upload()
    del files["adapter_config"]
    response = client.put("/v1/tasks/a", files=files, data={"adapter_config": "{}"})
    assert response.status_code == 422
    assert "adapter_config: expected a file part" in response.json()["error"]


def test_put_task_422_when_body_not_multipart(client: TestClient) -> None:
    response = client.put("/v1/tasks/a", json={"adapter_config": {}})
    assert response.status_code == 422
    assert "multipart/form-data" in response.json()["error"] and "application/json" in response.json()["error"]


def test_put_task_422_when_engine_rejects_adapter(client: TestClient) -> None:
    response = client.put("/v1/tasks/a", files=upload(config=b"not json"))
    assert response.status_code == 422
    assert "adapter_config.json" in response.json()["error"]


def test_put_task_413_when_engine_says_too_large(client: TestClient, engine: FakeEngine) -> None:
    response = client.put("/v1/tasks/a", files=upload(model=b"x" * (engine.max_adapter_bytes + 1)))
    assert response.status_code == 413
    assert response.json()["error_type"] == "too_large"


def test_put_task_413_before_reading_when_content_length_over_limit(engine: FakeEngine) -> None:
    settings = Settings(demo_tasks=False, max_adapter_bytes=1000, max_config_bytes=1000)
    with TestClient(create_app(settings, engine)) as client:
        response = client.put("/v1/tasks/a", files=upload(model=b"x" * (settings.max_upload_bytes + 1)))
    assert response.status_code == 413
    assert f"at most {settings.max_upload_bytes} bytes" in response.json()["error"]
    assert engine.tasks == {}


def test_put_task_413_when_chunked_body_over_limit(engine: FakeEngine) -> None:
    settings = Settings(demo_tasks=False, max_adapter_bytes=1000, max_config_bytes=1000)
    chunks = (b"x" * 16 * 1024 for _ in range(8))  # no Content-Length: counted as it streams in
    headers = {"content-type": "multipart/form-data; boundary=b"}
    with TestClient(create_app(settings, engine)) as client:
        response = client.put("/v1/tasks/a", content=chunks, headers=headers)
    assert response.status_code == 413
    assert response.json()["error_type"] == "too_large"


def test_put_task_413_when_config_part_over_its_limit(engine: FakeEngine) -> None:
    settings = Settings(demo_tasks=False, max_config_bytes=100)
    with TestClient(create_app(settings, engine)) as client:
        response = client.put("/v1/tasks/a", files=upload(config=b" " * 101))
    assert response.status_code == 413
    assert "adapter_config" in response.json()["error"]


def test_put_task_400_saying_what_the_multipart_parser_refused(client: TestClient, engine: FakeEngine) -> None:
    response = client.put("/v1/tasks/a", content=b"xx", headers={"content-type": "multipart/form-data"})
    assert response.status_code == 400
    assert response.json() == {
        "error": "expected a multipart/form-data body with the file parts 'adapter_config' and "
        "'adapter_model' (and optionally 'labels'); found a body the multipart parser refused (Missing boundary in "
        "multipart.)",
        "error_type": "validation",
    }
    files = [*upload().items(), ("labels", ("labels.json", b"[]")), ("extra", ("extra.bin", b"x"))]
    response = client.put("/v1/tasks/a", files=files)
    assert response.status_code == 400
    assert "Too many files" in response.json()["error"]
    assert engine.tasks == {}
