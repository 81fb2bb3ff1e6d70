"""GET /metrics: Prometheus text with promptserve_ names, fed by routes, the step listener and engine.stats()."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.api.app import create_app
from server.api.settings import Settings
from tests.api.conftest import upload
from tests.api.fake_engine import FakeEngine


def samples(client: TestClient) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = text_string_to_metric_families(response.text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


def names(client: TestClient) -> set[str]:
    return {name for name, _ in samples(client)}


def test_metrics_names_all_prefixed_promptserve(client: TestClient) -> None:
    client.post("/v1/generate", json={"inputs": "x"})
    assert all(name.startswith("promptserve_") for name in names(client))


def test_metrics_expose_the_serving_series(client: TestClient) -> None:
    client.post("/v1/generate", json={"inputs": "hello"})
    expected = {
        "promptserve_requests_total", "promptserve_e2e_request_latency_seconds_count",
        "promptserve_time_to_first_token_seconds_count", "promptserve_time_per_output_token_seconds_count",
        "promptserve_request_queue_time_seconds_count",
        "promptserve_request_prompt_tokens_count", "promptserve_request_generation_tokens_count",
        "promptserve_prompt_tokens_total", "promptserve_generation_tokens_total",
        "promptserve_num_requests_running", "promptserve_num_requests_waiting", "promptserve_batch_size_count",
        "promptserve_batch_distinct_tasks_count", "promptserve_prompt_cache_hits_total",
        "promptserve_prompt_cache_misses_total", "promptserve_prompt_cache_evictions_total",
        "promptserve_prompt_cache_resident_bytes", "promptserve_registered_tasks", "promptserve_ready",
        "promptserve_kv_cache_used_bytes", "promptserve_kv_cache_capacity_bytes", "promptserve_num_preemptions_total",
    }  # fmt: skip
    assert expected <= names(client)


def test_metrics_count_requests_by_outcome(client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("a")
    client.post("/v1/generate", json={"inputs": "x", "task_id": "a"})
    client.post("/v1/generate", json={"inputs": "x", "task_id": "nope"})
    client.post("/v1/generate_stream", json={"inputs": "x"})
    values = samples(client)
    total = "promptserve_requests_total"
    assert values[(total, (("endpoint", "generate"), ("outcome", "success")))] == 1
    assert values[(total, (("endpoint", "generate"), ("outcome", "not_found")))] == 1
    assert values[(total, (("endpoint", "generate_stream"), ("outcome", "success")))] == 1


def test_metrics_count_generated_tokens(client: TestClient) -> None:
    client.post("/v1/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 3}})
    assert samples(client)[("promptserve_generation_tokens_total", ())] == 3


def test_metrics_batch_shape_from_step_listener(client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("a")
    engine.add_task("b")
    client.post("/v1/generate", json={"inputs": "x", "task_ids": ["a", "b"], "ensemble": "mean",
                                      "parameters": {"max_new_tokens": 2}})  # fmt: skip
    values = samples(client)
    assert values[("promptserve_batch_size_sum", ())] == 4  # two steps of two rows
    assert values[("promptserve_batch_distinct_tasks_sum", ())] == 4


def test_metrics_gauges_read_engine_stats(client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("a")
    values = samples(client)
    assert values[("promptserve_registered_tasks", ())] == 1
    assert values[("promptserve_prompt_cache_hits_total", ())] == 7
    assert values[("promptserve_prompt_cache_resident_bytes", ())] == 4096


def test_metrics_count_task_registrations(client: TestClient) -> None:
    client.put("/v1/tasks/a", files=upload())
    client.put("/v1/tasks/a", files=upload())
    values = samples(client)
    assert values[("promptserve_task_registrations_total", (("result", "created"),))] == 1
    assert values[("promptserve_task_registrations_total", (("result", "replaced"),))] == 1


def test_metrics_separate_per_app(engine: FakeEngine) -> None:
    first = TestClient(create_app(Settings(demo_tasks=False), engine))
    second = TestClient(create_app(Settings(demo_tasks=False), FakeEngine()))
    first.post("/v1/generate", json={"inputs": "x"})
    assert ("promptserve_generation_tokens_total", ()) in samples(first)
    assert samples(second)[("promptserve_generation_tokens_total", ())] == 0
