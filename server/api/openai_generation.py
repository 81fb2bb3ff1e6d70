"""What the OpenAI-compatible routes share: `model` to task ids, choices as engine requests, their streams merged.

Every choice (prompt x n) is one engine request, so choices share the batch with each other and with /v1/generate.
Streams are data-only server-sent events ending with `data: [DONE]`; text that could still become a stop sequence
is held back, so the deltas of a choice always add up to its final text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from prompt_store.types import TaskRecord
from server.api.errors import ApiError, error_type_of, leading_field, openai_error_body, to_api_error
from server.api.generation import close_outputs, complete, next_output, observe, start_stream, until_disconnected
from server.api.metrics import Metrics, RequestTracker
from server.api.openai_schemas import SamplingFields
from server.api.schemas import TASK_ID_PATTERN
from server.api.settings import Settings
from server.engine.errors import InputTooLong, InvalidPrompt, NoChatTemplate, TaskNotFound
from server.engine.interface import EngineClient
from server.engine.types import Completion, EnsembleMode, GenerateInput, RequestOutput, Token

T = TypeVar("T")
P = TypeVar("P")
Outputs = AsyncIterator[RequestOutput]
DONE = "data: [DONE]\n\n"


# ---- `model` and the target tasks


def model_not_found(model: str, backbone: str) -> ApiError:
    return ApiError(
        404,
        "not_found",
        f"model: expected the backbone {backbone!r}, '{backbone}:<task>' or a registered task id (GET /v1/models "
        f"lists them); found {model!r}",
        param="model",
        code="model_not_found",
    )


def resolve_model(model: str, backbone: str, engine: EngineClient) -> TaskRecord | None:
    """The task `model` names (None: the bare backbone); a model that names nothing servable is 404."""
    if model == backbone:
        return None
    prefix, colon, task = model.rpartition(":")
    task_id = task if colon and prefix == backbone else model
    if re.fullmatch(TASK_ID_PATTERN, task_id) is None:
        raise model_not_found(model, backbone)
    try:
        return engine.get_task(task_id)
    except TaskNotFound:
        raise model_not_found(model, backbone) from None


def targets(
    body: SamplingFields, backbone: str, engine: EngineClient
) -> tuple[tuple[str | None, ...], EnsembleMode | None]:
    """(task ids, ensemble mode): one task from `model`, or the ensemble in the extra field `task_ids`."""
    if body.task_ids is None:
        record = resolve_model(body.model, backbone, engine)
        return (None if record is None else record.task_id,), None
    if body.model != backbone:
        raise ApiError(
            422,
            "validation",
            f"model: expected the backbone {backbone!r} when task_ids selects an ensemble; found {body.model!r}",
            param="model",
        )
    return tuple(body.task_ids), body.ensemble_mode


def max_new_tokens(asked: int | None, param: str, settings: Settings) -> int:
    if asked is None:
        return settings.default_max_new_tokens
    if asked > settings.engine.max_new_tokens_limit:
        raise ApiError(
            422,
            "validation",
            f"{param}: expected at most {settings.engine.max_new_tokens_limit}; found {asked}",
            param=param,
        )
    return asked


def check_choices(num_prompts: int, n: int, num_members: int, scored: bool, settings: Settings) -> None:
    """An ensemble's members run together, so they must fit one batch; the choices (n x prompts, and each prompt's
    scoring) are engine requests of their own that queue for rows as vLLM's do, so they must fit the waiting queue."""
    if num_members > settings.engine.max_batch_size:
        raise ApiError(422, "validation", f"task_ids: expected at most {settings.engine.max_batch_size} members (the "
                       f"server's batch size); found {num_members}", param="task_ids")  # fmt: skip
    limit = settings.engine.max_waiting
    if num_prompts * n + (num_prompts if scored else 0) > limit:
        param = "n" if n > 1 else "prompt"
        scorings = " and a scoring of each prompt" if scored else ""
        raise ApiError(
            422,
            "validation",
            f"{param}: expected at most {limit} choices per request (n x prompts{scorings}, which queue for rows: the "
            f"server's max_waiting); found {n} x {num_prompts}{f' + {num_prompts}' if scored else ''}",
            param=param,
        )


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    prompt_index: int
    request: GenerateInput


def plan(texts: Sequence[P], n: int, build: Callable[[P, int], GenerateInput]) -> list[Choice]:
    """Choices in OpenAI's order (prompt 0's n choices, then prompt 1's); `build(text, j)` makes choice j's
    request."""
    return [Choice(p * n + j, p, build(text, j)) for p, text in enumerate(texts) for j in range(n)]


# ---- errors in OpenAI's terms


@dataclass(frozen=True, slots=True)
class Params:
    """The request fields engine refusals concern: the input (prompt or messages) and the task (model or task_ids)."""

    input: str
    task: str = "model"


@contextlib.contextmanager
def openai_errors(params: Params) -> Iterator[None]:
    """Engine refusals named after the OpenAI fields they concern."""
    try:
        yield
    except TaskNotFound as exc:  # a task deleted after the model was resolved, or an ensemble member
        code = "model_not_found" if params.task == "model" else "not_found"
        raise ApiError(404, "not_found", str(exc), param=params.task, code=code) from exc
    except InputTooLong as exc:
        raise ApiError(400, "validation", str(exc), param=params.input, code="context_length_exceeded") from exc
    except NoChatTemplate as exc:
        raise ApiError(400, "validation", str(exc), param="messages", code="no_chat_template") from exc
    except InvalidPrompt as exc:  # its message opens with the field it concerns, where one does
        field = leading_field(str(exc))
        raise ApiError(400, "validation", str(exc), param=params.input if field == "prompt" else field) from exc


# ---- running the choices


def start_trackers(metrics: Metrics, endpoint: str, choices: list[Choice]) -> list[RequestTracker]:
    return [metrics.start_request(endpoint, choice.request.task_ids) for choice in choices]


def finish_all(trackers: list[RequestTracker], outcome: str) -> None:
    for tracker in trackers:
        tracker.finish(outcome)


async def gather_all(works: Sequence[Awaitable[T]]) -> list[T]:
    """All results, in order; the first failure cancels the rest (closing their engine iterators) and is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(ensure_coroutine(work)) for work in works]
    except BaseExceptionGroup as failed:
        raise first_error(failed) from None
    return [task.result() for task in tasks]


async def ensure_coroutine(work: Awaitable[T]) -> T:
    return await work


async def naming_prompt(work: Awaitable[T], prompt_index: int, num_prompts: int) -> T:
    """A refusal of one prompt of several names it ("prompt[2]: expected ..."), as /v1/classify names inputs[2]."""
    try:
        return await work
    except (InputTooLong, InvalidPrompt) as exc:
        message = str(exc)
        if num_prompts == 1 or leading_field(message) not in (None, "prompt"):
            raise
        raise type(exc)(f"prompt[{prompt_index}]: {message.removeprefix('prompt: ')}") from None


def first_error(group: BaseExceptionGroup) -> BaseException:
    error = group.exceptions[0]
    return first_error(error) if isinstance(error, BaseExceptionGroup) else error


async def complete_all(
    engine: EngineClient,
    choices: list[Choice],
    trackers: list[RequestTracker],
    answered: Mapping[int, Completion] | None = None,
) -> list[Completion]:
    """Every choice's completion; those `answered` already (by index: an echo with max_tokens 0) run nothing."""
    answered = answered or {}
    num_prompts = num_prompts_of(choices)
    return await gather_all([
        already(answered[c.index]) if c.index in answered
        else naming_prompt(complete(engine, c.request, t), c.prompt_index, num_prompts)
        for c, t in zip(choices, trackers, strict=True)
    ])  # fmt: skip


def num_prompts_of(choices: Sequence[Choice]) -> int:
    return choices[-1].prompt_index + 1 if choices else 0


async def already(completion: Completion) -> Completion:
    return completion


async def start_all(engine: EngineClient, choices: list[Choice]) -> list[tuple[RequestOutput, Outputs]]:
    """Every choice's first output (so an early error still gets its status); on failure the others are closed."""
    num_prompts = num_prompts_of(choices)
    tasks = [
        asyncio.ensure_future(naming_prompt(start_stream(engine, c.request), c.prompt_index, num_prompts))
        for c in choices
    ]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is None:
                await close_outputs(task.result()[1])
        raise


async def merged(started: list[tuple[RequestOutput, Outputs]]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """(choice index, output) as they arrive, across every choice, until each has its completion."""
    events: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()

    async def pump(index: int, first: RequestOutput, outputs: Outputs) -> None:
        output = first
        try:
            while True:
                await events.put((index, output))
                if output.completion is not None:
                    return
                output = await next_output(outputs)
        except Exception as exc:
            await events.put((index, exc))
        finally:
            await close_outputs(outputs)

    pumps = [asyncio.ensure_future(pump(i, first, outputs)) for i, (first, outputs) in enumerate(started)]
    try:
        remaining = len(pumps)
        while remaining:
            index, event = await events.get()
            if isinstance(event, BaseException):
                raise event
            remaining -= event.completion is not None
            yield index, event
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


# ---- one choice's stream


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could be the start of a stop sequence (they may yet be cut): the longest end
    of the text (shorter than the stop) that begins one. Only the text's last len(stop) - 1 characters are read."""
    longest = 0
    for stop in stops:
        tail = text[len(text) - min(len(text), len(stop) - 1) :]
        start = tail.find(stop[0])
        while start != -1 and len(tail) - start > longest:
            if stop.startswith(tail[start:]):
                longest = len(tail) - start
                break
            start = tail.find(stop[0], start + 1)
    return longest


@dataclass
class Delta:
    text: str
    tokens: list[Token]
    completion: Completion | None


@dataclass
class ChoiceStream:
    """Turns a choice's outputs into deltas whose texts add up to the completion's text."""

    stops: tuple[str, ...]
    text: str = ""  # every streamed token's text
    emitted: int = 0  # characters of it already sent
    num_tokens: int = 0
    completion: Completion | None = field(default=None, repr=False)

    def advance(self, output: RequestOutput) -> Delta:
        if output.completion is None:
            tokens = [] if output.token is None else [output.token]
            self.text += "".join(token.text for token in tokens)
            self.num_tokens += len(tokens)
            safe = len(self.text) - held_back(self.text, self.stops)
            delta = self.text[self.emitted : max(safe, self.emitted)]
            self.emitted = max(safe, self.emitted)
            return Delta(delta, tokens, None)
        self.completion = output.completion
        final, sent = output.completion.generated_text, self.text[: self.emitted]
        delta = final[len(sent) :] if final.startswith(sent) else ""
        return Delta(delta, list(output.completion.tokens[self.num_tokens :]), output.completion)


def sse_json(payload: str) -> str:
    return f"data: {payload}\n\n"


def error_event(exc: BaseException) -> str:
    return sse_json(json.dumps(openai_error_body(to_api_error(exc))))


async def run_tracked(request: Request, trackers: list[RequestTracker], work: Awaitable[T], params: Params) -> T:
    """Await the work unless the client leaves; a failure ends every choice's metrics and says which field."""
    try:
        with openai_errors(params):
            return await until_disconnected(request, work)
    except BaseException as exc:
        finish_all(trackers, error_type_of(exc))
        raise


async def stream_choices(
    started: list[tuple[RequestOutput, Outputs]], choices: list[Choice], trackers: list[RequestTracker]
) -> AsyncGenerator[tuple[Choice, Delta], None]:
    """Each choice's deltas as its outputs arrive; metrics observed and finished here."""
    streams = [ChoiceStream(choice.request.sampling.stop) for choice in choices]
    outcome = "cancelled"
    try:
        async with contextlib.aclosing(merged(started)) as outputs:  # closed now, not whenever it is collected
            async for index, output in outputs:
                observe(trackers[index], output)
                yield choices[index], streams[index].advance(output)
        outcome = "success"
    except Exception as exc:
        outcome = error_type_of(exc)
        raise
    finally:
        finish_all(trackers, outcome)


@dataclass
class Streams:
    """A streamed request's choices once started: their deltas, and a close that ends them however far the
    response got (a client may leave before the first delta is asked for)."""

    choices: list[Choice]
    started: list[tuple[RequestOutput, Outputs]]
    trackers: list[RequestTracker]

    def deltas(self) -> AsyncGenerator[tuple[Choice, Delta], None]:
        return stream_choices(self.started, self.choices, self.trackers)

    async def close(self) -> None:
        """Abort what is still running and count it as cancelled (both no-ops for what has finished)."""
        for _, outputs in self.started:
            await close_outputs(outputs)
        finish_all(self.trackers, "cancelled")
