"""Classification and scoring requests: validated into engine Requests (in the caller's thread), and the engine's
row results shaped into answers.

A classification input is one Request whose rows are its tasks (one, or a mean ensemble's members); a scoring
request is one Request per candidate, whose rows are its tasks. Requests of many callers share the engine's steps.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch

from prompt_store.registry import TaskStore
from prompt_store.types import SEQ_CLS, TaskArtifact
from server.engine.backbone import Backbone
from server.engine.errors import InputTooLong, InvalidPrompt, WrongKind
from server.engine.intake import IntakeConfig, check_token_ids, tokenize
from server.engine.request import Job, OutputSink, Request, Sequence
from server.engine.types import (
    CandidateScore,
    ClassifyInput,
    EnsembleMode,
    LabelScore,
    RowResult,
    SamplingParams,
    ScoreInput,
    Scores,
    TokenLabel,
)

MAX_INPUTS = 256  # classification inputs per request
MAX_CANDIDATES = 64  # scored candidates per request
Results = dict[int, RowResult]  # row index -> its result


@dataclass(frozen=True, slots=True)
class ClassifyPlan:
    """A classification's engine requests (one per input) and what shaping their results needs."""

    requests: list[Request]
    head_type: str
    labels: tuple[str, ...]
    offsets: list[list[tuple[int, int]]]  # per input, each token's character span (token tasks)
    special: list[list[bool]]  # per input, which tokens are special (left out of a token task's answer)


def check_task_ids(task_ids: tuple[str | None, ...], ensemble: EnsembleMode | None) -> None:
    if not task_ids:
        raise InvalidPrompt("expected a task id (or null for the backbone's own) or task_ids; found an empty list")
    if len(task_ids) > 1 and ensemble is not EnsembleMode.MEAN:
        raise InvalidPrompt(f"expected ensemble 'mean' for {len(task_ids)} task_ids; found {ensemble!r}")


def classification_tasks(
    task_ids: tuple[str | None, ...], backbone: Backbone, store: TaskStore
) -> tuple[list[TaskArtifact | None], str, tuple[str, ...]]:
    """The tasks (None: the checkpoint's own head), their head type and their labels, which members share."""
    if not backbone.heads:
        raise WrongKind(
            f"expected a backbone with classification heads for /v1/classify; this {backbone.kind.name} backbone "
            "serves none: use /v1/generate"
        )
    tasks = [store.load(task_id) if task_id is not None else None for task_id in task_ids]
    kinds = []
    for task_id, task in zip(task_ids, tasks, strict=True):
        if task is None:
            if backbone.bare_head is None:
                raise WrongKind(
                    "expected a task_id: this backbone's checkpoint has no trained classification head of its own; "
                    "found null"
                )
            kinds.append((backbone.bare_head.task_type, backbone.bare_head.labels))
        elif not task.record.is_classifier:
            raise WrongKind(
                f"expected SEQ_CLS or TOKEN_CLS tasks on /v1/classify; task {task_id!r} is a {task.record.task_type} "
                "task: use /v1/generate"
            )
        else:
            assert task.record.labels is not None
            kinds.append((task.record.task_type, task.record.labels))
    if len(set(kinds)) > 1:
        found = "; ".join(f"{task_id or 'the backbone'}: {kind} {list(labels)}" for task_id, (kind, labels) in
                          zip(task_ids, kinds, strict=True))  # fmt: skip
        raise InvalidPrompt(f"expected ensemble members of one task type with the same label names; found {found}")
    return tasks, kinds[0][0], kinds[0][1]


def plan_classify(
    request: ClassifyInput, backbone: Backbone, store: TaskStore, limits: IntakeConfig, sinks: list[OutputSink]
) -> ClassifyPlan:
    if not 1 <= len(request.inputs) <= MAX_INPUTS:
        raise InvalidPrompt(f"expected 1 to {MAX_INPUTS} inputs; found {len(request.inputs)}")
    if request.top_k is not None and request.top_k < 1:
        raise InvalidPrompt(f"expected top_k null or >= 1; found {request.top_k}")
    check_task_ids(request.task_ids, request.ensemble)
    tasks, head_type, labels = classification_tasks(request.task_ids, backbone, store)
    if head_type != SEQ_CLS and request.top_k is not None:
        raise InvalidPrompt(
            f"parameters.top_k: expected null for a {head_type} task (each token answers its best label); "
            f"found {request.top_k}"
        )
    plan = ClassifyPlan([], head_type, labels, [], [])
    for i, (text, sink) in enumerate(zip(request.inputs, sinks, strict=True)):
        input_ids = tokenize(backbone, text, limits)
        check_positions(backbone, tasks, len(input_ids), f"inputs[{i}]" if len(request.inputs) > 1 else "inputs")
        if head_type != SEQ_CLS:
            offsets, special = token_spans(backbone, text)
            plan.offsets.append(offsets)
            plan.special.append(special if len(offsets) == len(input_ids) else [True] * len(input_ids))
        result = Request(uuid.uuid4().hex, input_ids, request_sampling(), 0, sink, kind=backbone.kind,
                         job=Job.CLASSIFY, head_type=head_type)  # fmt: skip
        has_kv_prefix = backbone.kind.has_kv_prefix
        result.rows = [Sequence(result, task, i, has_kv_prefix(task, limits.prompts_as_kv)) for i, task in
                       enumerate(tasks)]  # fmt: skip
        plan.requests.append(result)
    return plan


def request_sampling() -> SamplingParams:
    """What a classification or scoring request samples: nothing (its max_new_tokens is 0)."""
    return SamplingParams(max_new_tokens=1)


def token_spans(backbone: Backbone, text: str) -> tuple[list[tuple[int, int]], list[bool]]:
    """Each token's character span in the text, and whether it is a special token (a fast tokenizer's offsets)."""
    if not backbone.tokenizer.is_fast:
        raise InvalidPrompt(
            "expected a backbone with a fast tokenizer for token classification (character offsets); found "
            f"{type(backbone.tokenizer).__name__}"
        )
    encoding = backbone.tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    return [tuple(span) for span in encoding["offset_mapping"]], [bool(f) for f in encoding["special_tokens_mask"]]


def check_positions(backbone: Backbone, tasks: list[TaskArtifact | None], num_tokens: int, what: str) -> None:
    """Virtual and input (and scored) tokens must fit the backbone's positions (RoBERTa's start past padding_idx);
    `what` names the tokens (one of many inputs, an input with a candidate)."""
    room = backbone.position_room
    if room is None:
        return
    num_virtual = max((task.record.num_virtual_tokens for task in tasks if task), default=0)
    if num_virtual + num_tokens > room:
        raise InputTooLong(
            f"{what}: expected at most {room - num_virtual} tokens (the backbone's {room} positions less "
            f"{num_virtual} virtual tokens); found {num_tokens}"
        )


def predictions(plan: ClassifyPlan, texts: tuple[str, ...], results: list[Results], top_k: int | None) -> tuple:
    """Each input's answer: the members' mean probabilities, as labels sorted by score or as labelled tokens."""
    answers: list[tuple[LabelScore, ...] | tuple[TokenLabel, ...]] = []
    for i, (text, rows) in enumerate(zip(texts, results, strict=True)):
        probs = torch.stack([rows[r].probs for r in sorted(rows)]).mean(0)
        if plan.head_type == SEQ_CLS:
            answers.append(label_scores(probs, plan.labels, top_k))
        else:
            answers.append(token_labels(probs, plan.labels, text, plan.offsets[i], plan.special[i]))
    return tuple(answers)


def label_scores(probs: torch.Tensor, labels: tuple[str, ...], top_k: int | None) -> tuple[LabelScore, ...]:
    order = torch.argsort(probs, descending=True, stable=True).tolist()
    return tuple(LabelScore(labels[i], float(probs[i])) for i in order[:top_k])


def token_labels(
    probs: torch.Tensor, labels: tuple[str, ...], text: str, offsets: list[tuple[int, int]], special: list[bool]
) -> tuple[TokenLabel, ...]:
    """Each input token's most likely label, with the text it covers; special tokens ([CLS], </s>) left out."""
    scores, best = probs.max(dim=-1)
    return tuple(
        TokenLabel(text[start:end], start, end, labels[int(best[i])], float(scores[i]))
        for i, ((start, end), is_special) in enumerate(zip(offsets, special, strict=True))
        if not is_special
    )


# ---- scoring


def generation_tasks(
    task_ids: tuple[str | None, ...], backbone: Backbone, store: TaskStore
) -> list[TaskArtifact | None]:
    backbone.kind.check_generation("/v1/score", backbone.model_id)
    tasks = [store.load(task_id) if task_id is not None else None for task_id in task_ids]
    for task_id, task in zip(task_ids, tasks, strict=True):
        if task is not None and task.record.is_classifier:
            raise WrongKind(
                f"expected {backbone.fingerprint.task_type} tasks on /v1/score; task {task_id!r} is a "
                f"{task.record.task_type} task: use /v1/classify"
            )
    return tasks


def candidate_ids(backbone: Backbone, candidate: str) -> list[int]:
    """A candidate's tokens: appended to a causal input as they are (no special tokens); an encoder-decoder's
    decoder target as the tokenizer makes targets (with its end-of-sequence token, as in training)."""
    ids = list(backbone.tokenizer(candidate, add_special_tokens=backbone.kind.special_tokens_in_targets)["input_ids"])
    if not ids:
        raise InvalidPrompt(f"expected candidates that tokenize to at least one token; found {candidate!r}")
    check_token_ids(backbone, ids, "candidates")
    return ids


def plan_score(
    request: ScoreInput, backbone: Backbone, store: TaskStore, limits: IntakeConfig, sinks: list[OutputSink]
) -> list[Request]:
    if not 1 <= len(request.candidates) <= MAX_CANDIDATES:
        raise InvalidPrompt(f"expected 1 to {MAX_CANDIDATES} candidates; found {len(request.candidates)}")
    check_task_ids(request.task_ids, EnsembleMode.MEAN)
    tasks = generation_tasks(request.task_ids, backbone, store)
    input_ids = tokenize(backbone, request.inputs, limits)
    has_kv_prefix = backbone.kind.has_kv_prefix
    requests = []
    for i, (candidate, sink) in enumerate(zip(request.candidates, sinks, strict=True)):
        targets = candidate_ids(backbone, candidate)
        for num_tokens in backbone.kind.scored_lengths(len(input_ids), len(targets)):
            check_positions(backbone, tasks, num_tokens, f"inputs with candidates[{i}]")
        result = Request(uuid.uuid4().hex, input_ids, request_sampling(), 0, sink, kind=backbone.kind, job=Job.SCORE)
        result.rows = [
            Sequence(result, task, i, has_kv_prefix(task, limits.prompts_as_kv), targets=targets)
            for i, task in enumerate(tasks)
        ]
        requests.append(result)
    return requests


def scores(candidates: tuple[str, ...], results: list[Results], input_tokens: int) -> Scores:
    """Each candidate's summed and mean token log-probability, averaged over the members."""
    out = []
    for candidate, rows in zip(candidates, results, strict=True):
        members = [rows[r].logprobs or () for r in sorted(rows)]
        num_tokens = len(members[0])
        total = sum(sum(m) for m in members) / len(members)
        out.append(CandidateScore(candidate, total, total / num_tokens, num_tokens))
    best = max(out, key=lambda s: s.logprob).candidate
    return Scores(tuple(out), best, input_tokens)
