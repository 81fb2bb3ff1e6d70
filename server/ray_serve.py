"""promptserve as a Ray Serve application: N replicas of the same engine and HTTP API behind Ray's HTTP proxy.

Two deployments. `promptserve-ingress` (light, no GPU) takes every HTTP request from Ray's proxy and relays it to
an engine replica through a DeploymentHandle (server/ray_ingress.py): a replica that dies is answered for in this
server's JSON, and a request it had not started answering is tried on another replica. `promptserve` is the
engines: each replica is one process with one engine (one GPU: `ray_actor_options={"num_gpus": 1}`) that runs
each relayed request through the whole FastAPI app of `create_app`, so every route (native, OpenAI, tasks,
metrics, streaming) works through the proxy.

Settings come from the same PROMPTSERVE_* environment (set it with the application's `runtime_env.env_vars`),
and builder arguments named like a setting override it. All replicas share one task store (a directory every
node mounts, or object storage): a task registered through any replica is servable on the others.

Task ids are deliberately NOT mapped to Ray's model multiplexing: it would route each task to its own
replicas and split the mixed-task batches that are the point of the product. Any replica serves any task; the
request router (server/task_router.py) prefers one that holds the request's task on its device (the ingress names
the task as its handle call's multiplexed model id, from Ray's `serve_multiplexed_model_id` header or the body's
`task_id` or `model`), else the replica the task's id hashes to, and the least busy when those are much busier.

    serve run server.ray_serve:build_app num_replicas=2 num_gpus=0 store_dir=/shared/store
    serve deploy deploy/ray/serve.yaml
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Message

from server.api.app import build_real_engine, create_app, prepare_engine
from server.api.auth import ApiKeyMiddleware
from server.api.errors import ApiError
from server.api.health import check_serving
from server.api.limits import BodyLimitMiddleware, BodyTimeoutMiddleware
from server.api.preflight import check_before_loading
from server.api.settings import Settings, load_settings, setting_names
from server.ray_ingress import ForwardedRequest, Relay, call_asgi
from server.task_router import RESIDENT_TASKS

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "promptserve"
INGRESS_NAME = "promptserve-ingress"


class ReplicaOptions(BaseModel):
    """How Ray runs the replicas (the builder's arguments that are not settings)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(default=None, ge=1)  # a fixed count; None: autoscale
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    # ongoing requests per replica the autoscaler aims at: well below max_ongoing_requests, so a replica
    # scales out while its batch still has room rather than once requests queue
    target_ongoing_requests: float = Field(default=16, gt=0)
    # the most requests the proxy hands one replica at once; a batching engine wants many (Ray's default is 5), and
    # what Ray holds back it retries with backoff: 256 at once through 1 replica, 23.4 requests/s at 64 and 62.5 at
    # 256 (benchmarks/results/ray-replicas-cpu-256-ongoing*.json); beyond it the engine's own queue answers 429
    max_ongoing_requests: int = Field(default=256, ge=1)
    num_gpus: float = Field(default=1, ge=0)  # one GPU per replica; 0 on a CPU-only cluster; a fraction shares one
    num_cpus: float = Field(default=1, ge=0)
    health_check_period_s: float = Field(default=10, gt=0)
    health_check_timeout_s: float = Field(default=30, gt=0)
    # the drain: a replica Ray stops (scale-down, a serve config update, a node drain) takes no new requests and has
    # this long to finish its running ones, then is killed; Ray's default 20 s cuts long generations short
    graceful_shutdown_timeout_s: float = Field(default=120, ge=0)
    # route a request to a replica holding its task (server/task_router.py); False: Ray's default router
    task_affinity: bool = True
    # how often each replica reports the tasks it holds to the routers (Ray's request_routing_stats_period_s)
    routing_stats_period_s: float = Field(default=2, gt=0)
    # a replica holding the task is passed over once it has this many more queued requests than the least busy one
    imbalanced_threshold: int = Field(default=16, ge=0)
    # an ingress deployment relays HTTP to the engine replicas (a dying replica's requests are retried or answered
    # in JSON); False: the engine replicas are Ray's HTTP ingress themselves (no hop: cheaper on a CPU-bound host,
    # but a dying replica's requests get Ray's plain-text 500)
    ingress: bool = True
    # the ingress: light (a fraction of a CPU, no GPU); two, so one dying does not stop traffic while Ray replaces it
    ingress_replicas: int = Field(default=2, ge=1)
    ingress_num_cpus: float = Field(default=0.25, ge=0)
    # what one ingress replica relays at once: every engine replica's max_ongoing_requests, and more
    ingress_max_ongoing_requests: int = Field(default=2048, ge=1)

    def deployment_options(self) -> dict[str, Any]:
        scaling: dict[str, Any] = (
            {"num_replicas": self.num_replicas, "autoscaling_config": None}
            if self.num_replicas is not None
            else {
                "autoscaling_config": {
                    "min_replicas": self.min_replicas,
                    "max_replicas": self.max_replicas,
                    "target_ongoing_requests": self.target_ongoing_requests,
                }
            }
        )
        return {
            **scaling,
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus},
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            **({"request_router_config": self.request_router_config()} if self.task_affinity else {}),
        }

    def request_router_config(self) -> dict[str, Any]:
        return {
            "request_router_class": "server.task_router:TaskAffinityRouter",
            "request_router_kwargs": {
                "imbalanced_threshold": self.imbalanced_threshold,
                "remember_s": 2 * self.routing_stats_period_s,  # till the replica's own report has come in
            },
            "request_routing_stats_period_s": self.routing_stats_period_s,
        }

    def ingress_options(self) -> dict[str, Any]:
        return {
            "num_replicas": self.ingress_replicas,
            "max_ongoing_requests": self.ingress_max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.ingress_num_cpus},
            # a request the ingress relays ends when its engine replica's does: the same drain
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            # each ingress replica's router remembers where it just sent a task; Ray's proxy sends a task's requests
            # to the ingress replica that had its last ones, so they meet that memory (no stats: it reports none)
            **({"request_router_config": self.request_router_config()} if self.task_affinity else {}),
        }


class PromptServe:
    """One engine replica: the engine is loaded before the replica takes traffic (Ray routes to it only once its
    constructor returns), then the unchanged FastAPI app serves the requests the ingress relays (`serve_http`)."""

    def __init__(self, overrides: dict[str, Any]) -> None:
        context = serve.get_replica_context()
        if context.rank.rank != 0:  # one replica seeds an empty store with the demo tasks, not each (versions 1..N)
            overrides = {**overrides, "demo_tasks": False}
        # the replica's own PROMPTSERVE_* environment, then the overrides
        settings = load_settings(overrides, builder_argument)
        # what Ray gave this replica, however it was configured (builder arguments, a config file's deployments)
        check_gpu_share(settings, ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
        self.replica_id = context.replica_id.to_full_id_str()
        check_before_loading(settings)  # a wrong store or model fails in seconds, before the model loads
        self.engine = prepare_engine(settings, build_real_engine)  # blocking: the replica serves nothing yet
        self.http_app = create_app(settings, self.engine, replica_id=self.replica_id)
        # the proxy's /metrics answers for one replica at a time: each replica's own port is scraped instead
        self.metrics_port: int | None = None
        if settings.metrics_port is not None:
            metrics = self.http_app.state.promptserve.metrics
            self.metrics_port = metrics.serve(settings.host, settings.metrics_port)
            logger.info("replica %s: /metrics on port %d", self.replica_id, self.metrics_port)
        logger.info("replica %s ready: %d tasks", self.replica_id, len(self.engine.list_tasks()))

    def record_routing_stats(self) -> dict[str, Any]:
        """What this replica tells Ray's routers every routing_stats_period_s: the tasks it holds on its device."""
        resident = self.engine.stats().cache.resident_tasks
        return {RESIDENT_TASKS: sorted({task_id for task_id, _ in resident})}

    def metrics_address(self) -> tuple[str, int | None]:
        """This replica's id and its metrics port (None: none); through a handle, for tests and discovery."""
        return self.replica_id, self.metrics_port

    async def serve_http(self, request: ForwardedRequest) -> AsyncIterator[list[Message]]:
        """One HTTP request relayed by the ingress, answered by this replica's app: its ASGI messages (called
        through a handle with `stream=True`)."""
        async for messages in call_asgi(self.http_app, request):
            yield messages

    async def check_health(self) -> None:
        """Ray's health check, /health/generate's: a replica whose engine stopped, stalled with work, or cannot
        serve one request is replaced."""
        try:
            await check_serving(self.http_app.state.promptserve)
        except ApiError as error:
            raise RuntimeError(f"replica {self.replica_id}: {error.message}") from None

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def builder_argument(name: str) -> str:
    return f"the builder argument {name}"


def check_gpu_share(settings: Settings, num_gpus: float) -> None:
    """Replicas sharing a GPU must be told their KV cache's size: sized from free memory, replicas starting
    together would each take the same share of it."""
    config = settings.engine
    if 0 < num_gpus < 1 and config.kv_cache_bytes is None:
        raise ValueError(
            f"num_gpus {num_gpus:g}: expected kv_cache_bytes (PROMPTSERVE_KV_CACHE_BYTES) set to each replica's share "
            f"of the GPU; found none, and replicas sharing a GPU would each take {config.kv_cache_memory_fraction:g} "
            "of the same free memory"
        )


class Ingress:
    """The HTTP side: each request, within the same body limits and API keys as a replica, relayed to an engine
    replica (server/ray_ingress.py)."""

    def __init__(self, engine: DeploymentHandle, overrides: dict[str, Any]) -> None:
        settings = load_settings(overrides, builder_argument)
        self.engine = engine.options(stream=True)
        relay: ASGIApp = Relay(self.forward)
        relay = BodyLimitMiddleware(relay, settings.max_upload_bytes, settings.max_request_bytes)
        relay = BodyTimeoutMiddleware(relay, settings.body_timeout_s)
        self.http_app = ApiKeyMiddleware(relay, settings.api_keys)  # before any body is read

    def forward(self, request: ForwardedRequest, task_id: str) -> AsyncIterator[list[Message]]:
        # the task id (Ray's multiplexed model id) is what the engine deployment's request router routes by
        return self.engine.options(multiplexed_model_id=task_id).serve_http.remote(request)  # type: ignore[no-any-return]

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return self.http_app


class DirectPromptServe(PromptServe):
    """An engine replica that is Ray's HTTP ingress itself (`ingress=false`): the proxy hands it the requests."""

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return self.http_app


PromptServeDeployment = serve.deployment(name=DEPLOYMENT_NAME)(PromptServe)
DirectDeployment = serve.deployment(name=DEPLOYMENT_NAME)(serve.ingress()(DirectPromptServe))
IngressDeployment = serve.deployment(name=INGRESS_NAME)(serve.ingress()(Ingress))


def build_app(args: dict[str, Any]) -> Application:
    """The application builder (`serve run server.ray_serve:build_app key=value ...`): arguments named like a
    setting (store_dir, model, torch_threads, ...) override the environment; the others are ReplicaOptions."""
    names = setting_names()
    overrides = {name: value for name, value in args.items() if name in names}
    load_settings(overrides, builder_argument)  # fail here, in the driver, on a bad setting, not in every replica
    options = ReplicaOptions(**{name: value for name, value in args.items() if name not in names})
    if not options.ingress:
        return DirectDeployment.options(**options.deployment_options()).bind(overrides)
    engines = PromptServeDeployment.options(**options.deployment_options()).bind(overrides)
    return IngressDeployment.options(**options.ingress_options()).bind(engines, overrides)


app = build_app({})  # `serve run server.ray_serve:app`: one GPU per replica, autoscaled, settings from the env
