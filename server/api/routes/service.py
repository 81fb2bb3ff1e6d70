"""GET /health, /info and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from server.api.errors import not_ready
from server.api.metrics import Metrics
from server.api.schemas import HealthResponse, InfoResponse
from server.api.state import AppState, get_engine, get_metrics, get_state
from server.engine.interface import EngineClient

router = APIRouter(tags=["service"])


@router.get("/health", response_model=HealthResponse)
def health(state: AppState = Depends(get_state)) -> HealthResponse:
    if not state.is_ready:
        raise not_ready(state.unavailable_reason())
    return HealthResponse()


@router.get("/info", response_model=InfoResponse)
def info(engine: EngineClient = Depends(get_engine)) -> InfoResponse:
    return InfoResponse.of(engine.info())


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(metrics: Metrics = Depends(get_metrics)) -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
