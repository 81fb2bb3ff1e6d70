"""promptserve on Ray Serve: a 2-replica CPU application on this machine, through Ray's HTTP proxy and the ingress.

Requests spread over both replicas (the replica header says which served each), and a task registered through
the proxy is served by both replicas with no 404. A replica killed mid-answer leaves every request its answer or
a JSON error (the last test: it waits for the replacement). Also: deploy/ray/serve.yaml is a valid Serve config.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from server.api.app import REPLICA_HEADER, create_app
from server.api.settings import ConfigurationError, Settings
from server.demo import ADAPTER_CONFIG, ADAPTER_MODEL, DEMO_TASKS
from tests.api.fake_engine import FakeEngine
from tests.api.helpers import metric_samples
from tests.deploy.helpers import ROOT
from tests.live_server import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
from ray.serve import Application  # noqa: E402

from server.ray_serve import (  # noqa: E402  (needs ray: skipped above without it)
    DEPLOYMENT_NAME,
    INGRESS_NAME,
    PromptServe,
    build_app,
    check_gpu_share,
)

SERVE_CONFIG = ROOT / "deploy" / "ray" / "serve.yaml"
NUM_REPLICAS = 2
MAX_TRIES = 60  # requests before concluding the proxy never reaches a replica (it picks among them at random)
TASK_HEADER = "serve_multiplexed_model_id"  # Ray's proxy hands its value to the request router
ROUTING_STATS_PERIOD_S = 0.5  # replicas report their tasks this often; the router remembers its choices for twice it


def cpu_app_args(store_dir: Path) -> dict[str, Any]:
    """Two CPU replicas of the built-in backbone, one torch thread each, sharing one (empty) store directory."""
    return {
        "num_replicas": NUM_REPLICAS,
        "num_gpus": 0,
        "num_cpus": 1,
        "store_dir": str(store_dir),
        "device": "cpu",
        "demo_tasks": True,
        "self_check": False,
        "torch_threads": 1,
        "metrics_port": 0,  # each replica's own, on a free port (two share this machine)
        "routing_stats_period_s": ROUTING_STATS_PERIOD_S,
    }


@pytest.fixture(scope="module")
def proxy_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cpu_app_args(tmp_path_factory.mktemp("store"))), name="promptserve", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def demo_files(name: str) -> dict[str, tuple[str, bytes, str]]:
    demo = DEMO_TASKS[name]
    return {
        "adapter_config": (ADAPTER_CONFIG, (demo / ADAPTER_CONFIG).read_bytes(), "application/json"),
        "adapter_model": (ADAPTER_MODEL, (demo / ADAPTER_MODEL).read_bytes(), "application/octet-stream"),
    }


def generate(client: httpx.Client, task_id: str | None) -> httpx.Response:
    body = {"inputs": "hello", "task_id": task_id, "parameters": {"max_new_tokens": 2}}
    return client.post("/v1/generate", json=body)


@pytest.mark.slow
def test_requests_spread_over_both_replicas(proxy_url: str) -> None:
    replicas = set()
    with httpx.Client(base_url=proxy_url, timeout=60) as client:
        for _ in range(MAX_TRIES):
            response = generate(client, None)
            assert response.status_code == 200, response.text
            replicas.add(response.headers[REPLICA_HEADER])
            if len(replicas) == NUM_REPLICAS:
                break
    assert len(replicas) == NUM_REPLICAS


@pytest.mark.slow
def test_every_route_kind_answers_through_the_proxy(proxy_url: str) -> None:
    with httpx.Client(base_url=proxy_url, timeout=60) as client:
        assert client.get("/health").status_code == 200
        model = client.get("/v1/models").json()["data"][0]["id"]
        assert b"promptserve" in client.get("/metrics").content
        completion = client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
        assert completion.status_code == 200, completion.text
        body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
        with client.stream("POST", "/v1/generate_stream", json=body) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data:")]
        assert stream.status_code == 200 and len(events) >= 2


@pytest.mark.slow
def test_task_registered_through_one_replica_is_served_by_the_other_at_once(proxy_url: str) -> None:
    """A new task's requests go to the replica its id hashes to, which for about half of the tasks is not the one
    its registration went to: that one serves it as soon as the PUT returns (it looks the task up in the store)."""
    with httpx.Client(base_url=proxy_url, timeout=60) as client:
        for i in range(MAX_TRIES):
            registered = client.put(f"/v1/tasks/shouty-{i}", files=demo_files("upper"))
            assert registered.status_code == 201, registered.text
            response = generate(client, f"shouty-{i}")
            assert response.status_code == 200, f"right after its registration: {response.text}"
            if response.headers[REPLICA_HEADER] != registered.headers[REPLICA_HEADER]:
                return
    pytest.fail(f"{MAX_TRIES} new tasks were all served first by the replica that registered them")


@pytest.mark.slow
def test_requests_for_a_task_go_to_the_replica_that_holds_it(proxy_url: str) -> None:
    """A new task is held nowhere: its first request goes to either replica and loads it there; the router sends
    the ones after it to that replica, first as the replica it just chose, then, each time its memory of that choice
    has run out, as the replica's report says (by chance, 6 such requests would all go there 1 time in 64)."""
    with httpx.Client(base_url=proxy_url, timeout=60) as client:
        assert client.put("/v1/tasks/sticky", files=demo_files("upper")).status_code == 201
        served = {routed_generate(client, "sticky") for _ in range(8)}
        served_later = set()
        for _ in range(6):
            time.sleep(ROUTING_STATS_PERIOD_S * 3)  # past the router's memory (twice the period)
            served_later.add(routed_generate(client, "sticky"))
    assert len(served) == 1 and served_later == served


@pytest.mark.slow
def test_openai_requests_naming_a_task_only_in_model_go_to_the_replica_that_holds_it(proxy_url: str) -> None:
    """As above, with no header: the ingress reads the task from the body's `model` for the engines' router."""
    with httpx.Client(base_url=proxy_url, timeout=60) as client:
        assert client.put("/v1/tasks/sticky-openai", files=demo_files("upper")).status_code == 201
        served = {openai_completion(client, "sticky-openai") for _ in range(8)}
        served_later = set()
        for _ in range(6):
            time.sleep(ROUTING_STATS_PERIOD_S * 3)
            served_later.add(openai_completion(client, "sticky-openai"))
    assert len(served) == 1 and served_later == served


def openai_completion(client: httpx.Client, model: str) -> str:
    """A completion as the `openai` client sends it (no Ray header); the replica that served."""
    response = client.post("/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 2})
    assert response.status_code == 200, response.text
    return response.headers[REPLICA_HEADER]


def routed_generate(client: httpx.Client, task_id: str) -> str:
    """Generate under a task named in the header Ray's proxy hands the request router; the replica that served."""
    body = {"inputs": "hello", "task_id": task_id, "parameters": {"max_new_tokens": 2}}
    response = client.post("/v1/generate", json=body, headers={TASK_HEADER: task_id})
    assert response.status_code == 200, response.text
    return response.headers[REPLICA_HEADER]


@pytest.mark.slow
def test_each_replica_serves_its_own_metrics_labelled_with_its_id(proxy_url: str) -> None:
    with httpx.Client(base_url=proxy_url, timeout=60) as client:
        for _ in range(4):
            assert generate(client, None).status_code == 200
    ports = replica_metrics_ports()
    assert len(ports) == NUM_REPLICAS and len(set(ports.values())) == NUM_REPLICAS
    for replica_id, port in ports.items():
        labelled = metric_samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text, constant=True)
        assert {value for _, labels in labelled for name, value in labels if name == "replica"} == {replica_id}
        assert any(name == "promptserve_ready" and value == 1 for (name, _), value in labelled.items())
        assert any(name == "promptserve_info" for name, _ in labelled)


def replica_metrics_ports() -> dict[str, int]:
    """Each engine replica's id and metrics port, asked through a handle to the engine deployment."""
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name="promptserve")
    ports: dict[str, int] = {}
    for _ in range(MAX_TRIES):
        replica_id, port = handle.metrics_address.remote().result(timeout_s=30)
        ports[replica_id] = port
        if len(ports) == NUM_REPLICAS:
            break
    return ports


@pytest.mark.slow
def test_demo_tasks_are_registered_once_by_one_replica(proxy_url: str) -> None:
    # by id, not GET /v1/tasks: a replica's listing learns of another replica's registrations only when it polls
    with httpx.Client(base_url=proxy_url, timeout=60) as client:
        versions = {task: client.get(f"/v1/tasks/{task}").json().get("version") for task in DEMO_TASKS}
    assert versions == dict.fromkeys(DEMO_TASKS, 1)


def test_serve_config_is_a_valid_serve_deploy_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    (application,) = config.applications
    assert application.import_path == "server.ray_serve:build_app"


def test_serve_config_args_build_an_autoscaled_gpu_application() -> None:
    (application,) = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]
    deployment = engine_deployment(build_app(application["args"]))
    assert deployment.ray_actor_options["num_gpus"] == 1
    assert deployment._deployment_config.autoscaling_config.target_ongoing_requests == 16
    # the drain a stopped replica gets (Ray's default is 20 s): as long as a pod's PROMPTSERVE_SHUTDOWN_GRACE_S
    drain = application["args"]["graceful_shutdown_timeout_s"]
    assert deployment._deployment_config.graceful_shutdown_timeout_s == drain == 120


def test_builder_refuses_an_unknown_argument() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        build_app({"num_replica": 2})


def test_builder_refuses_a_bad_setting_in_one_line_naming_the_argument() -> None:
    with pytest.raises(ConfigurationError, match=r"^the builder argument max_batch_size: expected a valid integer"):
        build_app({"max_batch_size": "many"})


def test_replicas_sharing_a_gpu_need_their_kv_cache_size() -> None:
    with pytest.raises(ValueError, match=r"num_gpus 0\.5: expected kv_cache_bytes .*found none"):
        check_gpu_share(Settings(demo_tasks=False), 0.5)
    check_gpu_share(Settings(demo_tasks=False, kv_cache_bytes=2**30), 0.5)
    for whole in (0, 1, 2):
        check_gpu_share(Settings(demo_tasks=False), whole)


def replica_over(engine: FakeEngine) -> PromptServe:
    """A replica object without Ray: its app over a fake engine, as its constructor would leave it."""
    replica = object.__new__(PromptServe)
    replica.replica_id, replica.engine = "promptserve#test", engine  # type: ignore[assignment]
    replica.http_app = create_app(Settings(demo_tasks=False), engine, replica_id=replica.replica_id)
    return replica


def test_check_health_passes_while_the_engine_serves() -> None:
    engine = FakeEngine()
    asyncio.run(replica_over(engine).check_health())
    assert engine.completed, "the check ran no request through the engine"


def test_check_health_raises_once_the_engine_stopped() -> None:
    engine = FakeEngine()
    replica = replica_over(engine)
    engine.shutdown()
    with pytest.raises(RuntimeError, match="the engine is not running"):
        asyncio.run(replica.check_health())


def test_check_health_raises_when_the_engine_stalls_with_work() -> None:
    engine = FakeEngine(stalled_s=120)
    with pytest.raises(RuntimeError, match=r"complete a step within 60 s .*found none for 120 s"):
        asyncio.run(replica_over(engine).check_health())


def engine_deployment(app: Application) -> Any:
    """The engine deployment the application's ingress is bound to (its first argument)."""
    engines = app._bound_deployment._replica_config.init_args[0]
    assert isinstance(engines, Application)
    return engines._bound_deployment


def test_serve_config_builds_an_ingress_in_front_of_the_engines() -> None:
    (application,) = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]
    app = build_app(application["args"])
    ingress = app._bound_deployment
    assert ingress.name == INGRESS_NAME and ingress.ray_actor_options.get("num_gpus", 0) == 0
    assert ingress._deployment_config.num_replicas == application["args"]["ingress_replicas"] == 2
    assert engine_deployment(app).name == DEPLOYMENT_NAME


def test_without_the_ingress_the_engine_replicas_are_rays_http_ingress() -> None:
    (application,) = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]
    app = build_app({**application["args"], "ingress": False})
    engines = app._bound_deployment
    assert engines.name == DEPLOYMENT_NAME and engines.ray_actor_options["num_gpus"] == 1
    bound = engines._replica_config.init_args
    assert not any(isinstance(arg, Application) for arg in bound), "expected the engines alone, behind no ingress"
    assert hasattr(engines.func_or_class, "__serve_build_asgi_app__"), "expected the engines to serve HTTP themselves"


# ---- a replica killed mid-answer (kept last in the file: the module's application is whole again only once Ray
# has replaced the replica, which this test waits for)

LONG = {"max_tokens": 160, "ignore_eos": True}  # long enough to be mid-answer when the replica is killed
KILL_AFTER_EVENTS = 20  # the stream's tokens before the kill: every request has been sent and is generating


def pid_listening_on(port: int) -> int:
    psutil = pytest.importorskip("psutil")
    (pid,) = {c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
    return int(pid)


def wait_for_replicas(count: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        deployment = serve.status().applications["promptserve"].deployments[DEPLOYMENT_NAME]
        if deployment.replica_states.get("RUNNING", 0) == count and deployment.status == "HEALTHY":
            return
        time.sleep(1)
    raise AssertionError(f"expected {count} running replicas within {timeout_s:g} s; found {deployment.replica_states}")


@pytest.mark.slow
def test_a_replica_killed_mid_answer_leaves_every_request_its_answer_or_a_json_error(proxy_url: str) -> None:
    openai = pytest.importorskip("openai")
    ports = replica_metrics_ports()

    async def scenario() -> tuple[str, list[str], list[httpx.Response], list[str]]:
        async with httpx.AsyncClient(base_url=proxy_url, timeout=120) as client:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
            body = {"model": model, "prompt": "hello", **LONG}
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
                events = (line async for line in stream.aiter_lines() if line.startswith("data:"))
                seen = [await anext(events)]
                victim = stream.headers[REPLICA_HEADER]  # the stream is mid-answer on this replica
                api = openai.AsyncOpenAI(base_url=f"{proxy_url}/v1", api_key="none", max_retries=3)
                plain = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(6)]
                clients = [asyncio.create_task(api.completions.create(model=model, prompt="hi", max_tokens=160,
                                                                      extra_body={"ignore_eos": True}))
                           for _ in range(4)]  # fmt: skip
                seen += [await anext(events) for _ in range(KILL_AFTER_EVENTS)]  # the others are generating too
                os.kill(pid_listening_on(ports[victim]), signal.SIGKILL)
                rest = seen + [line async for line in events]
                answers = await asyncio.gather(*plain)
                texts = [completion.choices[0].text for completion in await asyncio.gather(*clients)]
        return victim, rest, answers, texts

    victim, events, answers, texts = asyncio.run(scenario())
    # the stream had begun on the killed replica: it ends with the API's error event, then [DONE]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "replica_unavailable" and error["type"] == "server_error", error
    # the requests that had not started answering were tried on the other replica: every one answered in full
    for answer in answers:
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json", answer.text
        assert answer.headers[REPLICA_HEADER] != victim
        assert answer.json()["usage"]["completion_tokens"] == LONG["max_tokens"]
    assert len(texts) == 4 and all(texts)
    with httpx.Client(base_url=proxy_url, timeout=60) as client:
        health = client.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    wait_for_replicas(NUM_REPLICAS)
