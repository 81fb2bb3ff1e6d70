"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (errors in OpenAI's shape)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from prompt_store.errors import StoreUnavailable
from server.api.completion_prompts import (
    Prompt,
    Scored,
    choice_logprobs,
    choice_prompt_logprobs,
    echo_only,
    prepare_prompts,
    score_prompts,
    scoring_task,
)
from server.api.errors import ApiError, error_type_of
from server.api.metrics import Metrics
from server.api.openai_generation import (
    DONE,
    Choice,
    Params,
    Streams,
    check_choices,
    complete_all,
    error_event,
    finish_all,
    gather_all,
    max_new_tokens,
    model_not_found,
    openai_errors,
    plan,
    resolve_model,
    run_tracked,
    sse_json,
    start_all,
    start_trackers,
    targets,
)
from server.api.openai_schemas import (
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatRequest,
    ChatResponse,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
    finish_reason,
    new_id,
    now,
    prompt_logprobs_of,
)
from server.api.routes.generate import SSE_HEADERS
from server.api.settings import Settings
from server.api.state import AppState, get_engine, get_metrics, get_settings, get_state, served_model_name
from server.engine.interface import EngineClient
from server.engine.types import Completion, GenerateInput

router = APIRouter(tags=["openai"])
A = TypeVar("A")
B = TypeVar("B")


# ---- models


@router.get("/v1/models", response_model=ModelList)
async def list_models(
    engine: EngineClient = Depends(get_engine),
    settings: Settings = Depends(get_settings),
    state: AppState = Depends(get_state),
) -> ModelList:
    backbone = served_model_name(settings, engine)
    # the tasks these routes serve: classification tasks answer on /v1/classify only
    tasks = [ModelCard.task(record, backbone) for record in engine.list_tasks() if not record.is_classifier]
    return ModelList(data=[ModelCard.backbone(backbone, state.created), *tasks])


@router.get("/v1/models/{model:path}", response_model=ModelCard)
async def get_model(
    model: str,
    engine: EngineClient = Depends(get_engine),
    settings: Settings = Depends(get_settings),
    state: AppState = Depends(get_state),
) -> ModelCard:
    backbone = served_model_name(settings, engine)
    if not model:
        raise model_not_found(model, backbone)
    record = await run_in_threadpool(resolve_model, model, backbone, engine)  # a miss may ask the shared store
    card = ModelCard.backbone(backbone, state.created) if record is None else ModelCard.task(record, backbone)
    return card.model_copy(update={"id": model})  # the name asked for (`<backbone>:<task>` too), as OpenAI answers


# ---- completions


@router.post("/v1/completions", response_model=CompletionResponse)  # its events: openapi.py
async def completions(
    body: CompletionRequest,
    request: Request,
    engine: EngineClient = Depends(get_engine),
    metrics: Metrics = Depends(get_metrics),
    settings: Settings = Depends(get_settings),
) -> Response:
    new_tokens = max_new_tokens(body.max_tokens, "max_tokens", settings)
    prompts = await run_in_threadpool(prepare_prompts, body, new_tokens, engine, settings)
    inputs = [prompt.generation_input for prompt in prompts]
    choices = await run_in_threadpool(  # off the event loop: an unknown model may ask the shared store
        choices_of, body, inputs, new_tokens, body.logprobs, body.add_special_tokens, settings, engine,
        (metrics, "completions"),
    )  # fmt: skip
    return await answer(request, engine, metrics, body, choices, completion_route(body, engine, prompts, choices))


def completion_route(
    body: CompletionRequest, engine: EngineClient, prompts: list[Prompt], choices: list[Choice]
) -> Route:
    """The completions' shapes, the prompts' scoring when asked for, and with max_tokens 0 the echoes as answers."""
    answered = {}
    if body.max_tokens == 0:
        task_ids = choices[0].request.task_ids if choices else ()
        tasks = [engine.get_task(t) for t in task_ids if t is not None]  # resolved with the request's model
        answered = {c.index: echo_only(prompts[c.prompt_index], tasks) for c in choices}
    return Route(
        "completions",
        "prompt",
        partial(completion_chunks, body, prompts),
        partial(completion_response, body, prompts),
        prompt_scoring(body, engine, prompts, choices),
        answered,
    )


def prompt_scoring(
    body: CompletionRequest, engine: EngineClient, prompts: list[Prompt], choices: list[Choice]
) -> Callable[[], Awaitable[list[Scored]]] | None:
    if not body.scores_prompt:
        return None
    return partial(score_prompts, engine, prompts, scoring_task(choices), body.prompt_top)


@dataclass(frozen=True, slots=True)
class Route:
    """What differs between the two generation routes once their choices are planned."""

    endpoint: str  # the metrics' label
    input_param: str  # the field an input refusal names
    chunks: Callable[[Streams, list[Scored]], AsyncGenerator[BaseModel, None]]  # the stream's chunks
    response: Callable[[list[Choice], list[Completion], list[Scored]], BaseModel]  # the whole answer
    scoring: Callable[[], Awaitable[list[Scored]]] | None = None  # the prompts' own log-probabilities
    answered: dict[int, Completion] = field(default_factory=dict)  # choices answered without generating


async def answer(
    request: Request, engine: EngineClient, metrics: Metrics, body: SamplingFields, choices: list[Choice], route: Route
) -> Response:
    """Run the choices as engine requests (and the prompts' scoring beside them): a stream of chunks, or one JSON
    answer once all are complete."""
    trackers = start_trackers(metrics, route.endpoint, choices)
    fields = params(body, route.input_param)
    scoring = route.scoring or no_scores
    if body.stream:
        started, scored = await run_tracked(request, trackers, both(start_all(engine, choices), scoring()), fields)
        streams = Streams(choices, started, trackers)
        events = framed(streams, route.chunks(streams, scored))
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    work = complete_all(engine, choices, trackers, route.answered)
    results, scored = await run_tracked(request, trackers, both(work, scoring()), fields)
    finish_all(trackers, "success")
    return JSONResponse(route.response(choices, results, scored).model_dump(mode="json"))


async def no_scores() -> list[Scored]:
    return []


async def both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Two works at once (a failure cancels the other)."""
    a, b = await gather_all([first, second])
    return a, b  # type: ignore[return-value]


def choices_of(
    body: SamplingFields,
    inputs: list[str | tuple[int, ...] | bytes],
    new_tokens: int,
    top_logprobs: int | None,
    add_special_tokens: bool,
    settings: Settings,
    engine: EngineClient,
    tracked: tuple[Metrics, str],
) -> list[Choice]:
    try:
        task_ids, ensemble = targets(body, served_model_name(settings, engine), engine)
    except (ApiError, StoreUnavailable) as error:  # counted as /v1/generate counts an unknown task
        metrics, endpoint = tracked
        metrics.start_request(endpoint, (body.model,)).finish(error_type_of(error))
        raise
    check_choices(len(inputs), body.n, len(task_ids), body.scores_prompt, settings)

    def build(prompt: str | tuple[int, ...] | bytes, j: int) -> GenerateInput:
        sampling = body.sampling(max(new_tokens, 1), j, top_logprobs)
        text = prompt if isinstance(prompt, str) else ""
        ids = prompt if isinstance(prompt, tuple) else None
        embeds = prompt if isinstance(prompt, bytes) else None
        return GenerateInput(text, task_ids, ensemble, sampling, request_id=None,
                             add_special_tokens=add_special_tokens, input_ids=ids, input_embeds=embeds)  # fmt: skip

    return plan(inputs, body.n, build)


def params(body: SamplingFields, input_param: str) -> Params:
    return Params(input_param, "model" if body.task_ids is None else "task_ids")


def usage_of(n: int, results: list[Completion]) -> Usage:
    """The prompt counted once per prompt (its first choice), every choice's tokens counted."""
    return Usage.of(results[::n], results)


def completion_response(
    body: CompletionRequest, prompts: list[Prompt], choices: list[Choice], results: list[Completion],
    scored: list[Scored],
) -> CompletionResponse:  # fmt: skip
    out = []
    for choice, result in zip(choices, results, strict=True):
        prompt, own = prompts[choice.prompt_index], scored[choice.prompt_index] if scored else None
        echo = prompt.text if body.echo else ""
        out.append(
            CompletionChoice(
                index=choice.index,
                text=echo + result.generated_text,
                logprobs=choice_logprobs(body, prompt, own, result),
                finish_reason=finish_reason(result),
                prompt_logprobs=choice_prompt_logprobs(body, own),
            )
        )
    return CompletionResponse(
        id=new_id("cmpl"), created=now(), model=body.model, choices=out, usage=usage_of(body.n, results)
    )


async def framed(streams: Streams, chunks: AsyncGenerator[BaseModel, None]) -> AsyncIterator[str]:
    """OpenAI's stream framing: each chunk as `data: <json>`, a late error in-band (the status line is already
    sent), `data: [DONE]` last; the choices' engine requests end with the response, however it ends."""
    try:
        async for chunk in chunks:
            yield sse_json(chunk.model_dump_json())
    except Exception as exc:
        yield error_event(exc)
    finally:  # a client that left: its engine requests are aborted now, not at collection
        await chunks.aclose()
        await streams.close()
    yield DONE


async def completion_chunks(
    body: CompletionRequest, prompts: list[Prompt], streams: Streams, scored: list[Scored]
) -> AsyncGenerator[BaseModel, None]:
    """The prompts when echoed (with their log-probabilities when asked for), a chunk per delta, then the usage
    chunk when asked for."""
    choices = streams.choices
    chunk = CompletionResponse(id=new_id("cmpl"), created=now(), model=body.model, choices=[])
    offsets = [len(prompts[c.prompt_index].text) if body.echo else 0 for c in choices]
    results: list[Completion | None] = [None] * len(choices)
    for c in choices if body.echo or scored else ():
        own = scored[c.prompt_index] if scored else None
        echo = echo_chunk_logprobs(body, prompts[c.prompt_index], own)
        text = prompts[c.prompt_index].text if body.echo else ""
        chunk.choices = [CompletionChoice(index=c.index, text=text, logprobs=echo,
                                          prompt_logprobs=choice_prompt_logprobs(body, own))]  # fmt: skip
        yield chunk
    async with contextlib.aclosing(streams.deltas()) as deltas:
        async for choice, delta in deltas:
            if not (delta.text or delta.tokens or delta.completion):
                continue
            logprobs = None if body.logprobs is None else CompletionLogprobs.of(delta.tokens, offsets[choice.index])
            offsets[choice.index] += sum(len(token.text) for token in delta.tokens)
            reason = None if delta.completion is None else finish_reason(delta.completion)
            chunk.choices = [
                CompletionChoice(index=choice.index, text=delta.text, logprobs=logprobs, finish_reason=reason)
            ]
            yield chunk
            results[choice.index] = delta.completion
    if body.include_usage:
        chunk.choices, chunk.usage = [], usage_of(body.n, [r for r in results if r is not None])
        yield chunk


def echo_chunk_logprobs(body: CompletionRequest, prompt: Prompt, scored: Scored | None) -> CompletionLogprobs | None:
    if not body.echo or body.logprobs is None or scored is None:
        return None
    return CompletionLogprobs.of_prompt(scored, prompt.first_text, body.logprobs, prompt.text)


# ---- chat completions


@router.post("/v1/chat/completions", response_model=ChatResponse)  # its events: openapi.py
async def chat_completions(
    body: ChatRequest,
    request: Request,
    engine: EngineClient = Depends(get_engine),
    metrics: Metrics = Depends(get_metrics),
    settings: Settings = Depends(get_settings),
) -> Response:
    new_tokens = max_new_tokens(*body.max_tokens_field, settings)
    text = render(engine, body)
    tracked = (metrics, "chat_completions")
    choices = await run_in_threadpool(  # off the event loop: an unknown model may ask the shared store
        choices_of, body, [text], new_tokens, body.num_top_logprobs, body.add_special_tokens, settings, engine,
        tracked,
    )  # fmt: skip
    scoring = await run_in_threadpool(chat_scoring, body, engine, text, choices)
    route = Route("chat_completions", "messages", partial(chat_chunks, body), partial(chat_response, body), scoring)
    return await answer(request, engine, metrics, body, choices, route)


def chat_scoring(
    body: ChatRequest, engine: EngineClient, text: str, choices: list[Choice]
) -> Callable[[], Awaitable[list[Scored]]] | None:
    """vLLM's prompt_logprobs on chat: the rendered conversation's tokens scored."""
    if body.prompt_logprobs is None:
        return None
    prompt = Prompt(text, tuple(engine.tokenize(text, body.add_special_tokens)))
    return partial(score_prompts, engine, [prompt], scoring_task(choices), body.prompt_logprobs)


def render(engine: EngineClient, body: ChatRequest) -> str:
    """The messages through the backbone's chat template; what the template refuses is the messages' fault."""
    try:
        with openai_errors(Params("messages")):
            return engine.render_chat([message.for_template() for message in body.messages])
    except ApiError as error:
        error.param = "messages"
        raise


def chat_response(
    body: ChatRequest, choices: list[Choice], results: list[Completion], scored: list[Scored]
) -> ChatResponse:
    out = [
        ChatChoice(
            index=choice.index,
            message=ChatMessageOut(content=result.generated_text),
            logprobs=ChatLogprobs.of(list(result.tokens)) if body.logprobs else None,
            finish_reason=finish_reason(result),
        )
        for choice, result in zip(choices, results, strict=True)
    ]
    prompt_logprobs = prompt_logprobs_of(scored[0], body.prompt_logprobs) if scored and body.prompt_logprobs else None
    return ChatResponse(id=new_id("chatcmpl"), created=now(), model=body.model, choices=out,
                        usage=usage_of(body.n, results), prompt_logprobs=prompt_logprobs)  # fmt: skip


async def chat_chunks(body: ChatRequest, streams: Streams, scored: list[Scored]) -> AsyncGenerator[BaseModel, None]:
    """A role chunk per choice, then content deltas (the last with its finish_reason), then usage when asked for."""
    choices = streams.choices
    chunk = ChatChunk(id=new_id("chatcmpl"), created=now(), model=body.model, choices=[])
    results: list[Completion | None] = [None] * len(choices)
    for c in choices:
        chunk.choices = [ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))]
        yield chunk
    async with contextlib.aclosing(streams.deltas()) as deltas:
        async for choice, delta in deltas:
            if not (delta.text or delta.tokens or delta.completion):
                continue
            logprobs = ChatLogprobs.of(delta.tokens) if body.logprobs else None
            reason = None if delta.completion is None else finish_reason(delta.completion)
            content = ChatDelta(content=delta.text) if delta.text or reason is None else ChatDelta()
            chunk.choices = [
                ChatChunkChoice(index=choice.index, delta=content, logprobs=logprobs, finish_reason=reason)
            ]
            yield chunk
            results[choice.index] = delta.completion
    if body.include_usage:
        chunk.choices, chunk.usage = [], usage_of(body.n, [r for r in results if r is not None])
        yield chunk
