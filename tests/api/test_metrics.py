"""GET /metrics: Prometheus text with promptserve_ names, fed by routes, the step listener and engine.stats()."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.api.app import create_app
from server.api.settings import Settings
from tests.api.conftest import upload
from tests.api.fake_engine import FakeEngine
from tests.api.helpers import Samples, metric_samples

METRICS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def samples(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return metric_samples(response.text)


def names(client: TestClient) -> set[str]:
    return {name for name, _ in samples(client)}


def test_metrics_names_all_prefixed_promptserve_or_process(client: TestClient) -> None:
    client.post("/v1/generate", json={"inputs": "x"})
    assert all(name.startswith(("promptserve_", "process_")) for name in names(client))
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"} <= names(client)


def test_every_series_carries_the_served_model_name(engine: FakeEngine) -> None:
    settings = Settings(demo_tasks=False, served_model_name="base")
    with TestClient(create_app(settings, engine)) as client:
        client.post("/v1/generate", json={"inputs": "x"})
        labelled = metric_samples(client.get("/metrics").text, constant=True)
    assert labelled and all(("model_name", "base") in labels for _, labels in labelled)
    assert not any(name == "replica" for _, labels in labelled for name, _ in labels), "a replica label outside Ray"


def test_every_series_carries_the_replica_under_ray(engine: FakeEngine) -> None:
    with TestClient(create_app(Settings(demo_tasks=False), engine, replica_id="promptserve#abc")) as client:
        labelled = metric_samples(client.get("/metrics").text, constant=True)
    assert all(("replica", "promptserve#abc") in labels for _, labels in labelled)
    assert all(("model_name", "fake/tiny") in labels for _, labels in labelled)


def test_the_info_metric_names_version_backbone_dtype_device_and_kv_pool(client: TestClient) -> None:
    (labels,) = [dict(labels) for name, labels in samples(client) if name == "promptserve_info"]
    assert labels == {
        "version": "0.1.0", "backbone": "fake/tiny", "model_type": "llama", "dtype": "float32", "device": "cpu",
        "kv_cache_tokens": labels["kv_cache_tokens"],
    }  # fmt: skip
    assert int(labels["kv_cache_tokens"]) >= 0


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
        "promptserve_adapter_cache_used_bytes", "promptserve_adapter_cache_capacity_bytes",
        "promptserve_adapter_cache_entries", "promptserve_adapter_host_cache_hits_total",
        "promptserve_adapter_host_cache_misses_total", "promptserve_adapter_host_cache_used_bytes",
        "promptserve_adapter_host_cache_entries", "promptserve_adapter_host_cache_capacity_entries",
    }  # fmt: skip
    assert expected <= names(client)


def test_every_series_exported_is_named_on_the_metrics_page(client: TestClient) -> None:
    """docs/metrics.md names each promptserve_ family a server exports (a counter with its _total, as scraped), so
    dashboards and alerts can be written from the page."""
    client.post("/v1/generate", json={"inputs": "hello"})
    families = text_string_to_metric_families(client.get("/metrics").text)
    scraped = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    exported = {name for name in scraped if name.startswith("promptserve_")}
    named = set(re.findall(r"`(promptserve_\w+)`", METRICS_PAGE.read_text()))
    assert len(exported) > 40 and sorted(exported - named) == []


def test_metrics_count_requests_by_outcome(client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("a")
    client.post("/v1/generate", json={"inputs": "x", "task_id": "a"})
    client.post("/v1/generate", json={"inputs": "x", "task_id": "nope"})
    client.post("/v1/generate_stream", json={"inputs": "x"})
    values = samples(client)
    total = "promptserve_requests_total"
    assert values[(total, (("endpoint", "generate"), ("outcome", "success"), ("task", "a")))] == 1
    assert values[(total, (("endpoint", "generate"), ("outcome", "not_found"), ("task", "_other")))] == 1
    assert values[(total, (("endpoint", "generate_stream"), ("outcome", "success"), ("task", "_backbone")))] == 1


def test_metrics_count_generated_tokens(client: TestClient) -> None:
    client.post("/v1/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 3}})
    assert samples(client)[("promptserve_generation_tokens_total", (("task", "_backbone"),))] == 3


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
    assert ("promptserve_generation_tokens_total", (("task", "_backbone"),)) in samples(first)
    assert "promptserve_generation_tokens_total" not in names(second)


# ---- per task


def by_task(values: Samples, name: str, **others: str) -> dict[str | None, float]:
    """A series' values keyed by task, among its samples whose other labels are `others`."""
    found = {}
    for (sample, label_items), value in values.items():
        labels = dict(label_items)
        task = labels.pop("task", None)
        if sample == name and labels == others:
            found[task] = value
    return found


SUCCESS = {"endpoint": "generate", "outcome": "success"}


def limited_client(engine: FakeEngine, max_tasks: int) -> TestClient:
    return TestClient(create_app(Settings(demo_tasks=False, metrics_max_tasks=max_tasks), engine))


def generate(client: TestClient, task_id: str | None, max_new_tokens: int = 2) -> None:
    body = {"inputs": "x", "task_id": task_id, "parameters": {"max_new_tokens": max_new_tokens}}
    assert client.post("/v1/generate", json=body).status_code == 200


def test_metrics_label_request_series_by_task(client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("a")
    engine.add_task("b")
    generate(client, "a", max_new_tokens=3)
    generate(client, "a", max_new_tokens=3)
    generate(client, "b", max_new_tokens=2)
    values = samples(client)
    assert by_task(values, "promptserve_requests_total", **SUCCESS) == {"a": 2, "b": 1}
    assert by_task(values, "promptserve_generation_tokens_total") == {"a": 6, "b": 2}
    assert by_task(values, "promptserve_prompt_tokens_total") == {"a": 4, "b": 2}
    assert by_task(values, "promptserve_e2e_request_latency_seconds_count", endpoint="generate") == {"a": 2, "b": 1}
    assert by_task(values, "promptserve_time_to_first_token_seconds_count") == {"a": 2, "b": 1}
    assert by_task(values, "promptserve_time_per_output_token_seconds_count") == {"a": 2, "b": 1}


def test_metrics_label_bare_backbone_apart_from_tasks(client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("a")
    generate(client, None, max_new_tokens=3)
    generate(client, "a", max_new_tokens=2)
    values = samples(client)
    assert by_task(values, "promptserve_requests_total", **SUCCESS) == {"_backbone": 1, "a": 1}
    assert by_task(values, "promptserve_generation_tokens_total") == {"_backbone": 3, "a": 2}


def test_metrics_count_tasks_past_the_limit_as_other(engine: FakeEngine) -> None:
    for task_id in ("a", "b", "c", "d"):
        engine.add_task(task_id)
    with limited_client(engine, max_tasks=2) as client:
        for task_id, max_new_tokens in (("a", 1), ("b", 2), ("c", 3), ("d", 4), ("a", 1)):
            generate(client, task_id, max_new_tokens)
        generate(client, None)  # the backbone never takes a slot
        values = samples(client)
    assert by_task(values, "promptserve_requests_total", **SUCCESS) == {"a": 2, "b": 1, "_other": 2, "_backbone": 1}
    assert by_task(values, "promptserve_generation_tokens_total") == {"a": 2, "b": 2, "_other": 7, "_backbone": 2}
    assert by_task(values, "promptserve_task_cache_misses_total") == {"a": 1, "b": 1, "_other": 2}


def test_metrics_count_an_ensemble_once_and_its_members_in_the_cache(client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("a")
    engine.add_task("b")
    body = {"inputs": "x", "task_ids": ["a", "b"], "ensemble": "mean", "parameters": {"max_new_tokens": 2}}
    assert client.post("/v1/generate", json=body).status_code == 200
    values = samples(client)
    assert by_task(values, "promptserve_requests_total", **SUCCESS) == {"_ensemble": 1}
    assert by_task(values, "promptserve_generation_tokens_total") == {"_ensemble": 2}
    assert by_task(values, "promptserve_task_cache_misses_total") == {"a": 1, "b": 1}


def test_metrics_request_failing_before_output_takes_no_label(engine: FakeEngine) -> None:
    engine.add_task("a")
    with limited_client(engine, max_tasks=1) as client:
        assert client.post("/v1/generate", json={"inputs": "x", "task_id": "typo"}).status_code == 404
        generate(client, "a")
        values = samples(client)
    total = "promptserve_requests_total"
    assert values[(total, (("endpoint", "generate"), ("outcome", "not_found"), ("task", "_other")))] == 1
    assert values[(total, (("endpoint", "generate"), ("outcome", "success"), ("task", "a")))] == 1


def test_metrics_task_cache_series_from_step_events(client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("a")
    generate(client, "a")
    generate(client, "a")
    values = samples(client)
    assert by_task(values, "promptserve_task_cache_misses_total") == {"a": 1}
    assert by_task(values, "promptserve_task_cache_hits_total") == {"a": 1}
    assert by_task(values, "promptserve_task_cache_evictions_total") == {"a": 0}  # defined before the first one
    assert by_task(values, "promptserve_task_load_seconds_count") == {"a": 1}
    assert by_task(values, "promptserve_task_load_seconds_sum") == {"a": 0.002}


def test_metrics_resident_versions_by_tier(engine: FakeEngine) -> None:
    engine.add_task("a")
    engine.add_task("a")  # version 2
    engine.add_task("b")
    engine.add_task("c")
    with limited_client(engine, max_tasks=3) as client:
        generate(client, "a")
        generate(client, "b")
        values = samples(client)
    resident = {
        (labels["task"], labels["version"], labels["tier"]): value
        for (name, label_items), value in values.items()
        if name == "promptserve_resident_task_versions" and (labels := dict(label_items))
    }
    # c was never asked for: residency gives it no label of its own, and as _other it keeps no version either
    assert resident == {
        ("a", "2", "device"): 1, ("b", "1", "device"): 1,
        ("a", "2", "host"): 1, ("b", "1", "host"): 1, ("_other", "_other", "host"): 1,
    }  # fmt: skip


# ---- classification and scoring


def test_metrics_count_classify_and_score_by_endpoint_with_input_tokens(client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("a")
    score = {"inputs": "wxyz", "candidates": ["y", "n"], "task_id": "a"}
    assert client.post("/v1/classify", json={"inputs": ["abc", "de"], "task_id": "a"}).status_code == 200
    assert client.post("/v1/score", json=score).status_code == 200
    assert client.post("/v1/score", json={"inputs": "x", "candidates": ["y"]}).status_code == 200
    values = samples(client)
    total = "promptserve_requests_total"
    assert by_task(values, total, endpoint="classify", outcome="success") == {"a": 1}
    assert by_task(values, total, endpoint="score", outcome="success") == {"a": 1, "_backbone": 1}
    assert by_task(values, "promptserve_prompt_tokens_total") == {"a": 5 + 4, "_backbone": 1}  # the fake: a char each
    assert by_task(values, "promptserve_e2e_request_latency_seconds_count", endpoint="classify") == {"a": 1}
    assert not any(by_task(values, "promptserve_generation_tokens_total").values())  # nothing generated


def test_metrics_count_classify_ensembles_once_and_failures_by_outcome(client: TestClient, engine: FakeEngine) -> None:
    engine.add_task("a")
    engine.add_task("b")
    assert client.post("/v1/classify", json={"inputs": "x", "task_ids": ["a", "b"]}).status_code == 200
    assert client.post("/v1/classify", json={"inputs": "x", "task_id": "typo"}).status_code == 404
    assert client.post("/v1/score", json={"inputs": "x", "candidates": ["y"], "task_id": "typo"}).status_code == 404
    values = samples(client)
    assert by_task(values, "promptserve_requests_total", endpoint="classify", outcome="success") == {"_ensemble": 1}
    assert by_task(values, "promptserve_requests_total", endpoint="classify", outcome="not_found") == {"_other": 1}
    assert by_task(values, "promptserve_requests_total", endpoint="score", outcome="not_found") == {"_other": 1}
