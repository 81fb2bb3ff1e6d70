"""Turns a caller's GenerateInput into a validated Request: parameters, tokens, task versions, limits.

Runs in the caller's thread (never the engine's), so a bad request fails before it reaches the queue.
"""

from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass

import jinja2
import torch
from transformers import PreTrainedTokenizerBase

from prompt_store.registry import TaskStore
from prompt_store.types import TaskArtifact
from server.engine.backbone import Backbone
from server.engine.errors import InputTooLong, InvalidPrompt, NoChatTemplate, UnknownToken, WrongKind
from server.engine.kinds import ModelKind
from server.engine.prompt_embeds import load_prompt_embeds
from server.engine.request import OutputSink, Request, Sequence
from server.engine.sampler import MAX_TOP_LOGPROBS
from server.engine.types import GenerateInput, SamplingParams


@dataclass(frozen=True, slots=True)
class IntakeConfig:
    max_input_tokens: int
    max_new_tokens: int
    prompts_as_kv: bool = True  # prompt tasks enter rows as their shared keys and values (see task_cache)


def validate_sampling(params: SamplingParams, limits: IntakeConfig) -> None:
    checks = [
        (1 <= params.max_new_tokens <= limits.max_new_tokens, f"max_new_tokens in [1, {limits.max_new_tokens}]",
         params.max_new_tokens),
        (math.isfinite(params.temperature) and params.temperature > 0, "temperature > 0", params.temperature),
        (params.top_k >= 0, "top_k >= 0 (0 disables it)", params.top_k),
        (0 < params.top_p <= 1, "top_p in (0, 1]", params.top_p),
        (all(params.stop), "non-empty stop sequences", list(params.stop)),
        (params.top_logprobs is None or 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS,
         f"top_logprobs null or in [0, {MAX_TOP_LOGPROBS}]", params.top_logprobs),
        (0 <= params.min_tokens <= params.max_new_tokens,
         f"min_tokens in [0, max_new_tokens ({params.max_new_tokens})]", params.min_tokens),
    ]  # fmt: skip
    for ok, expected, found in checks:
        if not ok:
            raise InvalidPrompt(f"expected {expected}; found {found!r}")


def validate_tasks(request: GenerateInput) -> None:
    if not request.task_ids:
        raise InvalidPrompt("expected at least one task id (or null for the bare backbone); found an empty list")
    if request.ensemble is None and len(request.task_ids) != 1:
        raise InvalidPrompt(f"expected one task id without an ensemble mode; found {len(request.task_ids)}")


def prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool = True) -> list[int]:
    """A request's input as token ids (`promptserve train` encodes its data with this too)."""
    input_ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    if not input_ids:  # an empty input on a tokenizer that adds no <s>: start from its <s> or </s>, as HF does
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise InvalidPrompt("expected inputs that tokenize to at least one token; found none")
        input_ids = [start]
    return input_ids


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """Chat messages as the backbone's chat template writes them, ending where the assistant's answer starts. The
    text holds the template's special tokens: tokenize it with add_special_tokens=False (as vLLM does)."""
    if not tokenizer.chat_template:
        raise NoChatTemplate(
            "expected a backbone whose tokenizer has a chat template (tokenizer_config.json 'chat_template' or "
            "chat_template.jinja); found none: use /v1/completions with plain text"
        )
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    except jinja2.TemplateError as exc:  # templates refuse what they cannot render (raise_exception)
        raise InvalidPrompt(f"messages: expected what the backbone's chat template accepts; it says: {exc}") from None


def check_token_ids(backbone: Backbone, token_ids: list[int], what: str = "inputs") -> None:
    """Every id must have a row in the model's embedding table (a tokenizer may know more tokens than its model)."""
    limit = backbone.num_token_ids
    if not token_ids or (min(token_ids) >= 0 and max(token_ids) < limit):  # at C speed: the engine thread checks too
        return
    unknown = next(token_id for token_id in token_ids if not 0 <= token_id < limit)
    known = 0 <= unknown < len(backbone.tokenizer)  # the tokenizer's lookup overflows past 2**32
    token = backbone.tokenizer.convert_ids_to_tokens(unknown) if known else None
    raise UnknownToken(
        f"{what}: expected token ids the model can read (below its embedding table's {limit} rows); found token "
        f"{unknown}{f' ({token!r})' if token is not None else ''}"
    )


def tokenize(backbone: Backbone, text: str, limits: IntakeConfig, add_special_tokens: bool = True) -> list[int]:
    input_ids = prompt_ids(backbone.tokenizer, text, add_special_tokens)
    check_token_ids(backbone, input_ids)
    return check_length(input_ids, limits)


def given_ids(backbone: Backbone, token_ids: tuple[int, ...], limits: IntakeConfig) -> list[int]:
    """A prompt given as token ids: used as they are (no special tokens added), once checked."""
    if not token_ids:
        raise InvalidPrompt("expected a prompt of at least one token id; found none")
    check_token_ids(backbone, list(token_ids), "prompt")
    return check_length(list(token_ids), limits)


def input_ids_of(backbone: Backbone, request: GenerateInput, limits: IntakeConfig) -> list[int]:
    if request.input_ids is not None:
        return given_ids(backbone, request.input_ids, limits)
    return tokenize(backbone, request.inputs, limits, request.add_special_tokens)


def given_embeds(backbone: Backbone, data: bytes, limits: IntakeConfig) -> torch.Tensor:
    """A prompt given as embeddings: a causal backbone's rows only (an encoder-decoder's input is its encoder's)."""
    backbone.kind.check_prompt_tokens("prompt_embeds", backbone.model_id)
    return load_prompt_embeds(data, backbone.fingerprint.hidden_size, limits.max_input_tokens)


def check_length(input_ids: list[int], limits: IntakeConfig) -> list[int]:
    if len(input_ids) > limits.max_input_tokens:
        raise InputTooLong(
            f"expected at most {limits.max_input_tokens} input tokens (the server's max_input_tokens); found "
            f"{len(input_ids)}"
        )
    return input_ids


def capped_max_new_tokens(
    backbone: Backbone, sampling: SamplingParams, num_input: int, tasks: list[TaskArtifact | None]
) -> int:
    """The backbone cannot go past its position limit: cap the new tokens (the finish reason says `length`), or,
    where the request asked for them all (`within_positions`, OpenAI's routes), refuse what does not fit."""
    asked = sampling.max_new_tokens
    if backbone.max_positions is None:
        return asked
    room = backbone.kind.new_token_room(backbone.max_positions, asked, num_input, tasks)
    if sampling.within_positions and asked > room:
        raise InputTooLong(
            f"expected at most {room} new tokens, what the backbone's {backbone.max_positions} positions leave after "
            f"{backbone.kind.positions_taken(num_input, tasks)}; found max_tokens {asked}"
        )
    return min(asked, room)


def make_generators(params: SamplingParams, num_rows: int) -> tuple[random.Random, ...]:
    """A seeded request's generators of the sampler's draws, one a row, on the host: a row's draws never depend on
    its batch mates, nor on the device, nor on the steps its siblings are sampled in (an ensemble member's prefill
    may end a step before another's). Row 0 draws what random.Random(seed) does. Unseeded rows share torch's (vLLM
    keeps per-row generators for seeded rows only)."""
    if not params.do_sample or params.seed is None:
        return ()
    return tuple(random.Random(params.seed + (row << 64)) for row in range(num_rows))  # seeds are below 2**64


def single_row_request(
    request_id: str,
    input_ids: list[int],
    task: TaskArtifact | None,
    prompts_as_kv: bool,
    max_new_tokens: int,
    sink: OutputSink,
    kind: ModelKind,
) -> Request:
    """A greedy request of one row, built by the engine itself (its self-check, a new task's probe)."""
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    request = Request(request_id, input_ids, sampling, max_new_tokens, sink, kind=kind)
    request.rows = [Sequence(request, task, 0, kind.has_kv_prefix(task, prompts_as_kv))]
    return request


def build_request(
    request: GenerateInput, backbone: Backbone, store: TaskStore, limits: IntakeConfig, sink: OutputSink
) -> Request:
    """Validate and resolve: every task id to its current version (TaskNotFound if absent)."""
    validate_tasks(request)
    validate_sampling(request.sampling, limits)
    backbone.kind.check_generation("generation", backbone.model_id)
    embeds = None if request.input_embeds is None else given_embeds(backbone, request.input_embeds, limits)
    # embeddings given: their positions hold placeholder ids, and the model runner puts the embeddings there
    input_ids = [0] * len(embeds) if embeds is not None else input_ids_of(backbone, request, limits)
    tasks = [store.load(task_id) if task_id is not None else None for task_id in request.task_ids]
    for task in tasks:
        if task is not None and task.record.is_classifier:
            raise WrongKind(
                f"expected generation tasks ({backbone.fingerprint.task_type}); task {task.record.task_id!r} is a "
                f"{task.record.task_type} task: use /v1/classify"
            )
    result = Request(
        request_id=request.request_id or uuid.uuid4().hex,
        input_ids=input_ids,
        sampling=request.sampling,
        max_new_tokens=capped_max_new_tokens(backbone, request.sampling, len(input_ids), tasks),
        sink=sink,
        ensemble=request.ensemble,
        generators=make_generators(request.sampling, len(tasks)),
        kind=backbone.kind,
        input_embeds=None if embeds is None else embeds.to(backbone.device, backbone.dtype),
    )
    has_kv_prefix = backbone.kind.has_kv_prefix
    result.rows = [Sequence(result, task, i, has_kv_prefix(task, limits.prompts_as_kv)) for i, task in enumerate(tasks)]
    return result
