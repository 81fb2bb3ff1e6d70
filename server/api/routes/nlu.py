"""POST /v1/classify (SEQ_CLS and TOKEN_CLS tasks) and /v1/score (rank classification on a generative backbone)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from server.api.generation import tracked
from server.api.metrics import Metrics, RequestTracker
from server.api.nlu_schemas import ClassifyRequest, ClassifyResponse, ScoreRequest, ScoreResponse
from server.api.state import get_engine, get_metrics
from server.engine.interface import EngineClient
from server.engine.types import Classification, Scores

router = APIRouter(tags=["classification"])
Answer = TypeVar("Answer", Classification, Scores)


@router.post("/v1/classify", response_model=ClassifyResponse)
async def classify(
    body: ClassifyRequest,
    request: Request,
    engine: EngineClient = Depends(get_engine),
    metrics: Metrics = Depends(get_metrics),
) -> Response:
    classify_input = body.to_engine_input()
    tracker = metrics.start_request("classify", classify_input.task_ids)
    result = await answered(request, tracker, engine.classify(classify_input))
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
    result = await answered(request, tracker, engine.score(score_input))
    return JSONResponse(ScoreResponse.of(result).model_dump(mode="json"))


async def answered(request: Request, tracker: RequestTracker, work: Awaitable[Answer]) -> Answer:
    """The engine's answer (a disconnect cancels it), recorded: input tokens and the outcome."""
    result = await tracked(request, tracker, work)
    tracker.on_answer(result.input_tokens)
    tracker.finish("success")
    return result
