"""vLLM's tokenizer routes: /tokenize, /detokenize, /tokenizer_info (errors in OpenAI's shape, as vLLM's)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from server.api.openai_generation import resolve_model
from server.api.settings import Settings
from server.api.state import get_engine, get_settings, served_model_name
from server.api.tokenizer_schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
)
from server.engine.interface import EngineClient

router = APIRouter(tags=["tokenizer"])


@router.post("/tokenize", response_model=TokenizeResponse, response_model_exclude_none=True)
async def tokenize(
    body: TokenizeRequest, engine: EngineClient = Depends(get_engine), settings: Settings = Depends(get_settings)
) -> TokenizeResponse:
    room = await run_in_threadpool(max_model_len, body.model, engine, settings)
    text = body.prompt if body.prompt is not None else render(engine, body)
    tokens = await run_in_threadpool(engine.tokenize, text, body.with_special_tokens)
    strs = [engine.detokenize([token]) for token in tokens] if body.return_token_strs else None
    return TokenizeResponse(count=len(tokens), max_model_len=room, tokens=tokens, token_strs=strs)


def render(engine: EngineClient, body: TokenizeRequest) -> str:
    assert body.messages is not None
    return engine.render_chat([message.for_template() for message in body.messages])


def max_model_len(model: str | None, engine: EngineClient, settings: Settings) -> int:
    """The backbone's positions, less the virtual tokens of the task `model` names (404 if it names none)."""
    total = engine.tokenizer_info().model_max_length
    if model is None:
        return total
    record = resolve_model(model, served_model_name(settings, engine), engine)
    return total - (record.num_virtual_tokens if record is not None else 0)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(
    body: DetokenizeRequest, engine: EngineClient = Depends(get_engine), settings: Settings = Depends(get_settings)
) -> DetokenizeResponse:
    await run_in_threadpool(max_model_len, body.model, engine, settings)  # an unknown model is 404, as on /tokenize
    return DetokenizeResponse(prompt=engine.detokenize(body.tokens))


@router.get("/tokenizer_info", response_model=TokenizerInfoResponse)
async def tokenizer_info(engine: EngineClient = Depends(get_engine)) -> TokenizerInfoResponse:
    return TokenizerInfoResponse(**asdict(engine.tokenizer_info()))
