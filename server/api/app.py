"""The app factory: routes, error mapping, limits and metrics; the engine is built in the lifespan, off the loop.

`create_app(settings, engine)`: tests hand in an engine (a fake, or a real tiny one); otherwise the lifespan
builds the real engine in a thread, so /health answers 503 while the model loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import __version__
from server.api.auth import ApiKeyMiddleware, warn_if_open
from server.api.errors import install_error_handlers
from server.api.limits import BodyLimitMiddleware, BodyTimeoutMiddleware
from server.api.metrics import Metrics
from server.api.openapi import install_openapi
from server.api.routes import generate, nlu, openai, service, tasks, tokenizer
from server.api.settings import Settings
from server.api.state import AppState, served_model_name
from server.engine.errors import EngineError
from server.engine.interface import EngineClient

logger = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], EngineClient]
FailureHook = Callable[[BaseException], None]
Lifespan = Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]
DEMO_MODULE = "server.demo"
REPLICA_HEADER = "X-Promptserve-Replica"


def create_app(
    settings: Settings | None = None,
    engine: EngineClient | None = None,
    *,
    engine_factory: EngineFactory | None = None,
    on_engine_failure: FailureHook | None = None,
    replica_id: str | None = None,
) -> FastAPI:
    """With `engine`, serve it as is (the caller owns it); else build one with `engine_factory` (default: the
    real engine) at start-up and shut it down at exit. `on_engine_failure` lets the CLI stop the server.
    Every response names the replica that served it (`replica_id`, default `<hostname>-<pid>`)."""
    settings = settings or Settings()
    warn_if_open(settings)
    state = AppState(
        settings=settings,
        metrics=Metrics(lambda: state.engine, settings.metrics_max_tasks, lambda: series_labels(state, replica_id)),
    )
    if engine is not None:
        state.attach(engine)
    factory = engine_factory or build_real_engine
    lifespan = None if engine is not None else engine_lifespan(state, factory, on_engine_failure)
    app = FastAPI(title="promptserve", version=__version__, lifespan=lifespan)
    app.state.promptserve = state
    for module in (service, tasks, generate, nlu, openai, tokenizer):
        app.include_router(module.router)
    install_error_handlers(app)
    install_openapi(app, settings)
    app.add_middleware(
        BodyLimitMiddleware, upload_limit=settings.max_upload_bytes, request_limit=settings.max_request_bytes
    )
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=settings.body_timeout_s)
    app.add_middleware(ApiKeyMiddleware, secrets=settings.api_keys)  # before any body is read
    app.add_middleware(ReplicaHeaderMiddleware, replica_id=replica_id or default_replica_id())  # outermost
    return app


def series_labels(state: AppState, replica_id: str | None) -> dict[str, str]:
    """The labels on every metric: the served model id (once the engine is up) and, under Ray, the replica."""
    labels = {"model_name": served_model_name(state.settings, state.engine) if state.engine is not None else ""}
    return labels if replica_id is None else {**labels, "replica": replica_id}


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ReplicaHeaderMiddleware:
    """Adds `X-Promptserve-Replica` to every response (errors and streams too): which replica served it."""

    def __init__(self, app: ASGIApp, replica_id: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), replica_id.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


def engine_lifespan(state: AppState, factory: EngineFactory, on_failure: FailureHook | None) -> Lifespan:
    """The engine loads on a daemon thread: a shutdown (SIGTERM) during a load that takes minutes does not wait
    for it; the loader then stops the engine it built instead of serving it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(
            target=load_engine, args=(state, factory, on_failure), name="engine-loader", daemon=True
        )
        loader.start()
        try:
            yield
        finally:
            engine = state.stop_loading()
            if engine is not None:
                await asyncio.to_thread(shutdown, engine)
            elif state.engine_error is not None:  # it failed: only its clean-up is left (the failed engine freed)
                await asyncio.to_thread(loader.join)
            elif loader.is_alive():
                logger.warning("stopping while the engine is still loading: not waiting for it")

    return lifespan


def load_engine(state: AppState, factory: EngineFactory, on_failure: FailureHook | None) -> None:
    try:
        engine = prepare_engine(state.settings, factory)
    except Exception as exc:
        log_start_failure(exc)
        state.engine_error = f"{type(exc).__name__}: {exc}"
        if on_failure is not None:
            on_failure(exc)
        return
    if not state.attach_loaded(engine):
        logger.info("the server stopped while the engine loaded: stopping the engine")
        shutdown(engine)
        return
    logger.info("ready: serving %d tasks", len(engine.list_tasks()))


def log_start_failure(error: Exception) -> None:
    """A refusal the engine explains (an unsupported backbone, a failed self-check) is one line; anything else is
    unexpected and keeps its traceback."""
    if isinstance(error, EngineError):
        logger.error("the engine failed to start: %s", error)
        logger.debug("the engine's refusal", exc_info=error)
    else:
        logger.exception("the engine failed to start")


def prepare_engine(settings: Settings, factory: EngineFactory) -> EngineClient:
    """Blocking: build the engine, then seed an empty store with the demo tasks when asked to."""
    engine = factory(settings)
    try:
        if settings.demo_tasks:
            register_demo_tasks(engine, settings)
    except BaseException:
        shutdown(engine)  # the server will not start: stop the engine thread it would never use
        raise
    return engine


def build_real_engine(settings: Settings) -> EngineClient:
    from server.engine.async_engine import build_engine  # lazy: loads torch and transformers

    return build_engine(settings.engine)


def register_demo_tasks(engine: EngineClient, settings: Settings) -> None:
    """First start of the default backbone with an empty store: register the built-in demo tasks (server.demo)."""
    if settings.engine.model is not None:
        logger.info(
            "demo tasks are trained for the default backbone; not registering them for %s", settings.engine.model
        )
        return
    if engine.list_tasks():
        return
    if importlib.util.find_spec(DEMO_MODULE) is None:
        logger.warning("no %s module in this build: starting with an empty store", DEMO_MODULE)
        return
    importlib.import_module(DEMO_MODULE).register_demo_tasks(engine)


def shutdown(engine: EngineClient) -> None:
    engine.shutdown()
