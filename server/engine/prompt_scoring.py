"""A prompt's own log-probabilities (vLLM's `echo` with `logprobs`, and `prompt_logprobs`): each token after the ones
before it, as a scoring request whose input is the prompt's first token and whose targets are the rest, so it rides
in the engine's mixed batch like any /v1/score candidate."""

from __future__ import annotations

import uuid

from prompt_store.registry import TaskStore
from server.engine.backbone import Backbone
from server.engine.errors import InvalidPrompt
from server.engine.intake import IntakeConfig, given_ids
from server.engine.nlu import check_positions, generation_tasks
from server.engine.request import Job, OutputSink, Request, Sequence
from server.engine.sampler import MAX_TOP_LOGPROBS
from server.engine.types import Alternative, PromptScoreInput, PromptToken, RowResult, SamplingParams


def plan_prompt_score(
    request: PromptScoreInput, backbone: Backbone, store: TaskStore, limits: IntakeConfig, sink: OutputSink
) -> Request | None:
    """The scoring request (None: a one-token prompt, whose only token has no log-probability)."""
    what = "prompt log-probabilities (echo with logprobs, prompt_logprobs)"
    backbone.kind.check_prompt_tokens(what, backbone.model_id)  # an encoder-decoder's prompt is its encoder's input
    if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidPrompt(f"expected top_logprobs in [0, {MAX_TOP_LOGPROBS}]; found {request.top_logprobs}")
    token_ids = given_ids(backbone, request.token_ids, limits)
    tasks = generation_tasks((request.task_id,), backbone, store)
    check_positions(backbone, tasks, len(token_ids), "prompt")
    if len(token_ids) == 1:
        return None
    sampling = SamplingParams(max_new_tokens=1, top_logprobs=request.top_logprobs)
    result = Request(uuid.uuid4().hex, token_ids[:1], sampling, 0, sink, kind=backbone.kind, job=Job.SCORE)
    task = tasks[0]
    has_kv_prefix = backbone.kind.has_kv_prefix(task, limits.prompts_as_kv)
    result.rows = [Sequence(result, task, 0, has_kv_prefix, targets=token_ids[1:])]
    return result


def prompt_tokens(
    backbone: Backbone, token_ids: tuple[int, ...], scored: RowResult | None
) -> tuple[PromptToken | None, ...]:
    """The first token's entry is None (nothing precedes it); each other token with its text, as vLLM shows it
    (decoded on its own, special tokens included)."""
    if scored is None:
        return (None,)
    assert scored.logprobs is not None and scored.ranks is not None and scored.top is not None

    def decode(token_id: int) -> str:
        return str(backbone.tokenizer.decode([token_id]))

    out: list[PromptToken | None] = [None]
    for token_id, logprob, rank, top in zip(token_ids[1:], scored.logprobs, scored.ranks, scored.top, strict=True):
        alternatives = tuple(Alternative(i, decode(i), value) for i, value in top)
        out.append(PromptToken(token_id, decode(token_id), logprob, rank, alternatives))
    return tuple(out)
