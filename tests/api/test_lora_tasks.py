"""LoRA and IA3 tasks through the HTTP API on a real tiny engine: what is not served is refused with a 422 that names
the setting; the task listings and /v1/models show the method and the rank."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.settings import Settings
from server.engine.async_engine import AsyncEngine, build_engine
from tests.api.test_real_engine import adapter_files
from tests.fixtures import TinyBackbone
from tests.lora_fixtures import write_module_adapter

pytestmark = pytest.mark.slow

MAX_LORA_RANK = 8


@pytest.fixture(scope="module")
def adapters(tiny_llama: TinyBackbone, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-adapters")
    path = tiny_llama.path
    return {
        "lora": write_module_adapter(path, "lora", root / "lora", seed=1, target_modules=["q_proj", "v_proj"]),
        "ia3": write_module_adapter(
            path, "ia3", root / "ia3", seed=2, target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        "rank16": write_module_adapter(path, "lora", root / "rank16", seed=3, target_modules=["q_proj"], r=16),
    }


@pytest.fixture(scope="module")
def engine(tiny_llama: TinyBackbone, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsyncEngine]:
    store = tmp_path_factory.mktemp("store")
    settings = Settings(model=str(tiny_llama.path), store_dir=str(store), device="cpu", poll_interval_s=0,
                        demo_tasks=False, max_lora_rank=MAX_LORA_RANK)  # fmt: skip
    engine = build_engine(settings.engine)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def client(engine: AsyncEngine) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(demo_tasks=False), engine)) as client:
        yield client


def with_config(adapter_dir: Path, **edits: Any) -> dict[str, tuple[str, bytes, str]]:
    files = adapter_files(adapter_dir)
    config = {**json.loads(files["adapter_config"][1]), **edits}
    return {**files, "adapter_config": ("adapter_config.json", json.dumps(config).encode(), "application/json")}


@pytest.mark.parametrize(
    ("edits", "named"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"bias": "lora_only"}, "bias"),
        ({"target_modules": ["embed_tokens"]}, "embeddings"),
    ],
)
def test_an_unserved_lora_setting_is_a_422_naming_it(
    client: TestClient, adapters: dict[str, Path], edits: dict[str, Any], named: str
) -> None:
    response = client.put("/v1/tasks/refused", files=with_config(adapters["lora"], **edits))
    assert (response.status_code, response.json()["error_type"]) == (422, "validation")
    assert named in response.json()["error"]
    assert client.get("/v1/tasks/refused").status_code == 404


def test_a_rank_above_max_lora_rank_is_a_422_with_both_numbers(client: TestClient, adapters: dict[str, Path]) -> None:
    response = client.put("/v1/tasks/too-big", files=adapter_files(adapters["rank16"]))
    assert response.status_code == 422
    assert f"max_lora_rank {MAX_LORA_RANK}" in response.json()["error"] and "rank 16" in response.json()["error"]
    assert client.get("/info").json()["max_lora_rank"] == MAX_LORA_RANK


def test_lora_and_ia3_tasks_are_registered_served_replaced_and_deleted(
    client: TestClient, engine: AsyncEngine, adapters: dict[str, Path]
) -> None:
    for name in ("lora", "ia3"):
        assert client.put(f"/v1/tasks/{name}", files=adapter_files(adapters[name])).status_code == 201
    assert not any(key[0] == "#probe" for key in engine.engine.tasks.adapters.resident)  # the probe's weights left
    tasks = {t["task_id"]: t for t in client.get("/v1/tasks").json()["tasks"]}
    assert {k: (t["method"], t["rank"], t["num_virtual_tokens"]) for k, t in tasks.items()} == {
        "lora": ("lora", 4, 0),
        "ia3": ("ia3", None, 0),
    }
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert (models["lora"]["method"], models["lora"]["rank"]) == ("lora", 4)
    assert (models["ia3"]["method"], models["ia3"]["rank"]) == ("ia3", None)

    def answer(task: str | None) -> str:
        body = {"inputs": "hello world", "task_id": task, "parameters": {"max_new_tokens": 6}}
        response = client.post("/v1/generate", json=body)
        assert response.status_code == 200, response.text
        return str(response.json()["generated_text"])

    bare, lora, ia3 = answer(None), answer("lora"), answer("ia3")
    assert lora != bare and ia3 != bare
    ensemble = {"inputs": "hello world", "task_ids": ["lora", "ia3", "lora"], "parameters": {"max_new_tokens": 6}}
    assert client.post("/v1/generate", json=ensemble).json()["generated_text"] == lora  # two votes of three

    replaced = client.put("/v1/tasks/lora", files=adapter_files(adapters["ia3"]))
    assert (replaced.status_code, replaced.json()["version"], replaced.json()["method"]) == (200, 2, "ia3")
    assert answer("lora") == ia3
    assert client.delete("/v1/tasks/lora").status_code == 204
    assert client.post("/v1/generate", json={"inputs": "x", "task_id": "lora"}).status_code == 404
    metrics = client.get("/metrics").text
    assert "promptserve_adapter_cache_entries" in metrics and "promptserve_adapter_cache_used_bytes" in metrics
