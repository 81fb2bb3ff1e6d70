"""The API against a real tiny engine (random Llama with GQA, PEFT adapters saved by PEFT itself), on CPU."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.api.app import create_app
from server.api.settings import Settings
from server.engine.async_engine import AsyncEngine, build_engine
from server.engine.types import GenerateInput, SamplingParams
from tests.api.helpers import body_chunks, call_until, events_of, metric_samples
from tests.fixtures import TinyBackbone

LORA_INFO = "promptserve_lora_requests_info"

pytestmark = pytest.mark.slow


def real_settings(tiny: TinyBackbone, store: Path) -> Settings:
    return Settings(model=str(tiny.path), store_dir=str(store), device="cpu", poll_interval_s=0, demo_tasks=False)


def adapter_files(adapter_dir: Path) -> dict[str, tuple[str, bytes, str]]:
    return {
        "adapter_config": (
            "adapter_config.json",
            (adapter_dir / "adapter_config.json").read_bytes(),
            "application/json",
        ),
        "adapter_model": ("adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes(), ""),
    }


@pytest.fixture(scope="module")
def real_engine(tiny_llama: TinyBackbone, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsyncEngine]:
    engine = build_engine(real_settings(tiny_llama, tmp_path_factory.mktemp("store")).engine)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def real(real_engine: AsyncEngine, tiny_llama: TinyBackbone) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(demo_tasks=False), real_engine)) as client:
        for kind in ("prompt_tuning", "prefix"):
            assert client.put(f"/v1/tasks/{kind}", files=adapter_files(tiny_llama.adapters[kind])).status_code == 201
        yield client


def wait_idle(engine: AsyncEngine, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.stats().num_running or engine.stats().num_waiting or engine.stats().cache.num_pinned:
        assert time.monotonic() < deadline, f"engine still busy: {engine.stats()}"
        time.sleep(0.01)


def wait_healthy(client: TestClient, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_real_lifespan_builds_engine_from_settings(tiny_llama: TinyBackbone, tmp_path: Path) -> None:
    with TestClient(create_app(real_settings(tiny_llama, tmp_path / "store"))) as client:
        wait_healthy(client)
        assert client.get("/info").json()["num_key_value_heads"] == 2


def test_real_registered_tasks_listed_with_records(real: TestClient) -> None:
    records = {record["task_id"]: record for record in real.get("/v1/tasks").json()["tasks"]}
    assert records["prompt_tuning"]["method"] == "prompt_tuning"
    assert records["prefix"]["method"] == "prefix_tuning"
    assert records["prefix"]["num_virtual_tokens"] == 3


def test_real_generate_under_task_reports_version(real: TestClient) -> None:
    body = {"inputs": "hello", "task_id": "prefix", "parameters": {"max_new_tokens": 4, "details": True}}
    details = real.post("/v1/generate", json=body).json()["details"]
    assert (details["task_id"], details["task_version"]) == ("prefix", 1)
    assert len(details["tokens"]) == details["generated_tokens"] <= 4


def test_real_stream_tokens_match_generate(real: TestClient) -> None:
    body = {"inputs": "hello", "task_id": "prompt_tuning", "parameters": {"max_new_tokens": 5, "details": True}}
    answer = real.post("/v1/generate", json=body).json()
    events = events_of(real.post("/v1/generate_stream", json=body).text)
    streamed = [event["token"]["id"] for event in events if event["token"] is not None]
    assert streamed == [token["id"] for token in answer["details"]["tokens"]]
    assert events[-1]["generated_text"] == answer["generated_text"]


def test_real_ensemble_mean_lists_members(real: TestClient) -> None:
    body = {"inputs": "hi", "task_ids": ["prompt_tuning", "prefix"], "ensemble": "mean",
            "parameters": {"max_new_tokens": 3}}  # fmt: skip
    members = real.post("/v1/generate", json=body).json()["details"]["members"]
    assert [member["task_id"] for member in members] == ["prompt_tuning", "prefix"]


def test_real_unknown_ensemble_member_404(real: TestClient) -> None:
    response = real.post("/v1/generate", json={"inputs": "hi", "task_ids": ["prefix", "missing"]})
    assert (response.status_code, response.json()["error_type"]) == (404, "not_found")


def test_real_invalid_adapter_422(real: TestClient, tiny_llama: TinyBackbone) -> None:
    files = adapter_files(tiny_llama.adapters["prefix"])
    files["adapter_model"] = ("adapter_model.safetensors", b"not safetensors", "")
    response = real.put("/v1/tasks/broken", files=files)
    assert (response.status_code, response.json()["error_type"]) == (422, "validation")


def test_real_stream_disconnect_frees_engine(real: TestClient, real_engine: AsyncEngine) -> None:
    app = create_app(Settings(demo_tasks=False), real_engine)
    body = {"inputs": "hello", "task_id": "prefix", "parameters": {"max_new_tokens": 400}}
    sent = asyncio.run(call_until(app, "/v1/generate_stream", body, lambda sent: len(body_chunks(sent)) >= 2))
    assert len(body_chunks(sent)) < 400
    wait_idle(real_engine)


def test_real_metrics_record_engine_steps(real: TestClient) -> None:
    real.post("/v1/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}})
    text = real.get("/metrics").text
    count = next(line for line in text.splitlines() if line.startswith("promptserve_batch_size_count"))
    assert float(count.split()[-1]) > 0
    assert json.loads(real.get("/health").text) == {"status": "ok"}


def test_real_metrics_report_the_kv_pool(real: TestClient, real_engine: AsyncEngine) -> None:
    real.post("/v1/generate", json={"inputs": "x", "task_id": "prefix", "parameters": {"max_new_tokens": 2}})
    values = {name: value for (name, labels), value in metric_samples(real.get("/metrics").text).items() if not labels}
    engine = real_engine.engine
    assert values["promptserve_kv_cache_capacity_bytes"] == engine.memory.num_blocks * engine.pool.block_bytes
    # the prefix task stays resident in its blocks once no row holds it
    assert 0 < values["promptserve_kv_cache_used_bytes"] < values["promptserve_kv_cache_capacity_bytes"]
    assert values["promptserve_num_preemptions_total"] == real_engine.engine.num_preemptions


def test_real_metrics_follow_a_task_onto_the_device(real: TestClient) -> None:
    body = {"inputs": "x", "task_id": "prefix", "parameters": {"max_new_tokens": 2}}
    for _ in range(2):
        assert real.post("/v1/generate", json=body).status_code == 200
    values = metric_samples(real.get("/metrics").text)
    task = (("task", "prefix"),)
    misses = values[("promptserve_task_cache_misses_total", task)]
    assert misses >= 1 and values[("promptserve_task_cache_hits_total", task)] >= 1  # the second request hits
    assert values[("promptserve_task_load_seconds_count", task)] == misses
    assert values[("promptserve_task_load_seconds_sum", task)] > 0
    for tier in ("device", "host"):
        labels = (("task", "prefix"), ("tier", tier), ("version", "1"))
        assert values[("promptserve_resident_task_versions", labels)] == 1


def test_real_metrics_count_an_eviction(tiny_llama: TinyBackbone, tmp_path: Path) -> None:
    """Prompt tasks as input embeddings within a 1-byte budget: the second one pushes the first out."""
    base = real_settings(tiny_llama, tmp_path / "store")
    settings = Settings(engine=replace(base.engine, cache_prompt_kv=False, prompt_cache_bytes=1), demo_tasks=False)
    with TestClient(create_app(settings)) as client:
        wait_healthy(client)
        for kind in ("prompt_tuning", "p_tuning_mlp"):
            assert client.put(f"/v1/tasks/{kind}", files=adapter_files(tiny_llama.adapters[kind])).status_code == 201
            body = {"inputs": "x", "task_id": kind, "parameters": {"max_new_tokens": 2}}
            assert client.post("/v1/generate", json=body).status_code == 200
        values = metric_samples(client.get("/metrics").text)
    evictions = "promptserve_task_cache_evictions_total"
    assert values[(evictions, (("task", "prompt_tuning"),))] == 1
    assert values[(evictions, (("task", "p_tuning_mlp"),))] == 0
    on_device = [labels for (name, labels) in values if name == "promptserve_resident_task_versions"
                 and ("tier", "device") in labels]  # fmt: skip
    assert on_device == [(("task", "p_tuning_mlp"), ("tier", "device"), ("version", "1"))]


def test_a_token_the_model_cannot_read_is_a_400_naming_it_while_streams_run_on(
    tiny_llama: TinyBackbone, tmp_path: Path
):
    """A tokenizer with one token more than the model's embedding table (added without resize_token_embeddings):
    the request holding it is refused; streams mid-answer beside it finish with the text they have alone."""
    from transformers import AutoTokenizer

    widened = tmp_path / "widened"
    shutil.copytree(tiny_llama.path, widened)
    tokenizer = AutoTokenizer.from_pretrained(widened)
    tokenizer.add_tokens(["<extra>"], special_tokens=True)
    tokenizer.save_pretrained(widened)
    engine = build_engine(real_settings(TinyBackbone("llama", widened), tmp_path / "store").engine)
    body = {"inputs": "a stream", "parameters": {"max_new_tokens": 200}}
    try:
        with TestClient(create_app(Settings(demo_tasks=False), engine)) as client:
            alone = client.post("/v1/generate", json=body).json()["generated_text"]

            async def scenario() -> tuple[list[str], httpx.Response]:
                started = [asyncio.Event() for _ in range(4)]

                async def stream(first: asyncio.Event) -> str:
                    request = GenerateInput("a stream", (None,), sampling=SamplingParams(max_new_tokens=200))
                    async for output in engine.generate(request):
                        first.set()
                        if output.completion is not None:
                            return output.completion.generated_text
                    raise AssertionError("no completion")

                streams = [asyncio.create_task(stream(first)) for first in started]
                await asyncio.gather(*(first.wait() for first in started))  # every stream mid-answer
                bad = await asyncio.to_thread(client.post, "/v1/generate", json={"inputs": "hi <extra>"})
                return list(await asyncio.gather(*streams)), bad

            texts, bad = asyncio.run(scenario())
        assert bad.status_code == 400 and bad.json()["error_type"] == "validation"
        assert f"found token {engine.backbone.num_token_ids} ('<extra>')" in bad.json()["error"]
        assert texts == [alone] * 4
    finally:
        engine.shutdown()


def lora_requests_info(text: str) -> tuple[dict[str, str], float]:
    """The one `promptserve_lora_requests_info` series, read as the inference extension's picker reads it."""
    (family,) = [family for family in text_string_to_metric_families(text) if family.name == LORA_INFO]
    (sample,) = family.samples
    return {name: value for name, value in sample.labels.items() if name not in ("model_name", "replica")}, sample.value


def test_real_metrics_report_resident_tasks_as_vllm_lora_info(real: TestClient, real_engine: AsyncEngine) -> None:
    body = {"inputs": "x", "task_id": "prefix", "parameters": {"max_new_tokens": 2}}
    assert real.post("/v1/generate", json=body).status_code == 200
    before = time.time()
    labels, value = lora_requests_info(real.get("/metrics").text)
    assert set(labels) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
    assert "prefix" in labels["running_lora_adapters"].split(",") and labels["waiting_lora_adapters"] == ""
    resident = {task_id for task_id, _ in real_engine.stats().cache.resident_tasks}
    assert set(labels["running_lora_adapters"].split(",")) == resident
    assert int(labels["max_lora"]) >= len(resident)
    assert before - 1 <= value <= time.time() + 1  # the reading's time: the picker keeps the latest series


def test_real_metrics_report_a_waiting_request_s_task(tiny_llama: TinyBackbone, tmp_path: Path) -> None:
    """One row at a time: while a long request runs under one task, a request for another task waits, and its task
    (not on the device yet) is reported waiting."""
    base = real_settings(tiny_llama, tmp_path / "store")
    settings = Settings(engine=replace(base.engine, max_batch_size=1), demo_tasks=False)
    with TestClient(create_app(settings)) as client:
        wait_healthy(client)
        for kind in ("prompt_tuning", "prefix"):
            assert client.put(f"/v1/tasks/{kind}", files=adapter_files(tiny_llama.adapters[kind])).status_code == 201
        engine = client.app.state.promptserve.engine
        long = {"model": "prefix", "prompt": "x", "max_tokens": 500, "ignore_eos": True}
        short = {"inputs": "x", "task_id": "prompt_tuning", "parameters": {"max_new_tokens": 1}}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(client.post, "/v1/completions", json=long)
            wait_for(lambda: engine.stats().num_running == 1)
            waiting = pool.submit(client.post, "/v1/generate", json=short)
            wait_for(lambda: engine.stats().num_waiting == 1)
            labels, _ = lora_requests_info(client.get("/metrics").text)
            assert running.result().status_code == waiting.result().status_code == 200
    assert labels["running_lora_adapters"].split(",")[0] == "prefix"
    assert labels["waiting_lora_adapters"] == "prompt_tuning"


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)
