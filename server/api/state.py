"""What the routes share: the settings, the engine once it is up, the metrics; and the FastAPI dependencies."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from fastapi import Depends, Request

from server.api.auth import bearer_token, is_one_of
from server.api.errors import not_ready, unauthorized
from server.api.metrics import Metrics
from server.api.settings import Settings
from server.engine.interface import EngineClient


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    engine: EngineClient | None = None
    engine_error: str | None = None  # why the engine failed to start, if it did
    created: int = field(default_factory=lambda: int(time.time()))  # the backbone's `created` in /v1/models
    is_stopping: bool = False  # the server is shutting down: an engine that finishes loading now is not served
    loading_lock: threading.Lock = field(default_factory=threading.Lock)  # orders the loader and the shutdown

    def attach(self, engine: EngineClient) -> None:
        engine.add_step_listener(self.metrics.on_step)
        self.engine = engine

    def attach_loaded(self, engine: EngineClient) -> bool:
        """The loader's engine is served, unless the server began stopping while it loaded (False)."""
        with self.loading_lock:
            if self.is_stopping:
                return False
            self.attach(engine)
            return True

    def stop_loading(self) -> EngineClient | None:
        """The server stops: an engine still loading will not be attached. Returns the engine to shut down."""
        with self.loading_lock:
            self.is_stopping = True
            return self.engine

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self.engine.is_ready()

    def health_problem(self) -> str | None:
        """Why the server is not serving (liveness), or None: not ready, or ready but its engine stalled."""
        if self.engine is None or not self.is_ready:
            return self.unavailable_reason()
        limit, stalled = self.settings.stall_timeout_s, self.engine.stalled_seconds()
        if limit > 0 and stalled > limit:
            return (
                f"expected the engine to complete a step within {limit:g} s while it has work (STALL_TIMEOUT_S); "
                f"found none for {stalled:.0f} s"
            )
        return None

    def unavailable_reason(self) -> str:
        if self.engine_error is not None:
            return f"the engine failed to start: {self.engine_error}"
        if self.engine is None:
            return "the model is still loading; retry shortly"
        return "the engine is not running"


def get_state(request: Request) -> AppState:
    return request.app.state.promptserve


def get_metrics(request: Request) -> Metrics:
    return get_state(request).metrics


def get_settings(request: Request) -> Settings:
    return get_state(request).settings


def get_engine(state: AppState = Depends(get_state)) -> EngineClient:
    if state.engine is None or not state.is_ready:
        raise not_ready(state.unavailable_reason())
    return state.engine


def require_admin(request: Request, settings: Settings = Depends(get_settings)) -> None:
    """With an admin token configured, writes need `Authorization: Bearer <token>`."""
    if settings.admin_token is None:
        return
    token = bearer_token(request.headers.get("authorization", ""))
    if token is None:
        raise unauthorized("expected the header 'Authorization: Bearer <admin token>'; found no bearer token")
    if not is_one_of(token, (settings.admin_token.get_secret_value().encode(),)):
        raise unauthorized("expected the server's admin token; found a different bearer token")


def served_model_name(settings: Settings, engine: EngineClient) -> str:
    """The backbone's id on the OpenAI routes (`model`): the setting, else the model's own id."""
    return settings.served_model_name or engine.info().model_id
