"""POST /v1/generate and /v1/generate_stream."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.generation import check_members, complete, start_stream, stream_events, tracked
from server.api.metrics import Metrics
from server.api.schemas import GenerateRequest, GenerateResponse
from server.api.settings import Settings
from server.api.state import get_engine, get_metrics, get_settings
from server.engine.interface import EngineClient

router = APIRouter(tags=["generation"])
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/v1/generate", response_model=GenerateResponse)
async def generate(
    body: GenerateRequest,
    request: Request,
    engine: EngineClient = Depends(get_engine),
    metrics: Metrics = Depends(get_metrics),
    settings: Settings = Depends(get_settings),
) -> Response:
    generate_input = body.to_engine_input(settings.default_max_new_tokens)
    check_members(generate_input.task_ids, settings.engine.max_batch_size)
    tracker = metrics.start_request("generate", generate_input.task_ids)
    completion = await tracked(request, tracker, complete(engine, generate_input, tracker))
    tracker.finish("success")
    return JSONResponse(GenerateResponse.of(completion, body.parameters.details).model_dump(mode="json"))


@router.post("/v1/generate_stream", response_class=StreamingResponse)  # its events: openapi.py
async def generate_stream(
    body: GenerateRequest,
    request: Request,
    engine: EngineClient = Depends(get_engine),
    metrics: Metrics = Depends(get_metrics),
    settings: Settings = Depends(get_settings),
) -> Response:
    generate_input = body.to_engine_input(settings.default_max_new_tokens)
    check_members(generate_input.task_ids, settings.engine.max_batch_size)
    tracker = metrics.start_request("generate_stream", generate_input.task_ids)
    first, outputs = await tracked(request, tracker, start_stream(engine, generate_input))
    events = stream_events(first, outputs, body.parameters.details, tracker)
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
