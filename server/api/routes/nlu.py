"""POST /v1/classify (SEQ_CLS and TOKEN_CLS tasks) and /v1/score (rank classification on a generative backbone)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from server.api.generation import tracked
from server.api.metrics import Metrics
from server.api.nlu_schemas import ClassifyRequest, ClassifyResponse, ScoreRequest, ScoreResponse
from server.api.state import get_engine, get_metrics
from server.engine.interface import EngineClient

router = APIRouter(tags=["classification"])


@router.post("/v1/classify", response_model=ClassifyResponse)
async def classify(
    body: ClassifyRequest,
    request: Request,
    engine: EngineClient = Depends(get_engine),
    metrics: Metrics = Depends(get_metrics),
) -> Response:
    classify_input = body.to_engine_input()
    tracker = metrics.start_request("classify", classify_input.task_ids)
    result = await tracked(request, tracker, engine.classify(classify_input))
    tracker.on_answer(result.input_tokens)
    tracker.finish("success")
    return JSONResponse(ClassifyResponse.of(result).model_dump(mode="json"))


@router.post("/v1/score", response_model=ScoreResponse)
async def score(
    body: ScoreRequest,
    request: Request,
    engine: EngineClient = Depends(get_engine),
    metrics: Metrics = Depends(get_metrics),
) -> Response:
    score_input = body.to_engine_input()
    tracker = metrics.start_request("score", score_input.task_ids)
    result = await tracked(request, tracker, engine.score(score_input))
    tracker.on_answer(result.input_tokens)
    tracker.finish("success")
    return JSONResponse(ScoreResponse.of(result).model_dump(mode="json"))
