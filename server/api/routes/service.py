"""GET /health, /health/generate, /info and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from server.api.health import check_live, check_serving
from server.api.metrics import Metrics
from server.api.schemas import DeepHealthResponse, HealthResponse, InfoResponse
from server.api.state import AppState, get_engine, get_metrics, get_state
from server.engine.interface import EngineClient

router = APIRouter(tags=["service"])


@router.get("/health", response_model=HealthResponse)
def health(state: AppState = Depends(get_state)) -> HealthResponse:
    """Liveness: 503 while loading, after the engine stopped, or once it has had work and completed no step for
    STALL_TIMEOUT_S."""
    check_live(state)
    return HealthResponse()


@router.get("/health/generate", response_model=DeepHealthResponse)
async def health_generate(state: AppState = Depends(get_state)) -> DeepHealthResponse:
    """One request through the engine (a token generated): 503 if it cannot be served."""
    return DeepHealthResponse(checked=await check_serving(state))


@router.get("/info", response_model=InfoResponse)
def info(engine: EngineClient = Depends(get_engine)) -> InfoResponse:
    return InfoResponse.of(engine.info())


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(metrics: Metrics = Depends(get_metrics)) -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
