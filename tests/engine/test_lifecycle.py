"""Finish reasons, ensembles, and every reference count back to zero after finish, abort and failure."""

from __future__ import annotations

from dataclasses import replace

import pytest

from server.engine.errors import GenerationFailed, InputTooLong, QueueFull
from server.engine.types import EnsembleMode, FinishReason
from tests.engine.harness import Harness, token_ids


def test_length_finish_reason_at_max_new_tokens(harness: Harness):
    completion = harness.alone("abc", "prefix", max_new_tokens=3)
    assert completion.finish_reason is FinishReason.LENGTH
    assert completion.generated_tokens == 3 and len(completion.tokens) == 3


def test_completion_reports_task_version_and_input_tokens(harness: Harness):
    completion = harness.alone("abc", "prompt_tuning", max_new_tokens=2)
    assert (completion.task_id, completion.task_version) == ("prompt_tuning", 1)
    assert completion.input_tokens == len(harness.backbone.tokenizer("abc")["input_ids"])


def test_stop_sequence_truncates_text(harness: Harness):
    free = harness.alone("abc", "prefix", max_new_tokens=12)
    text = free.generated_text
    assert len(text) >= 3, "the fixture should generate visible text"
    stop = text[1:3]
    stopped = harness.alone("abc", "prefix", max_new_tokens=12, stop=(stop,))
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.generated_text == text[: text.index(stop)]


def test_eos_finish_reason_when_model_emits_eos(harness: Harness):
    eos = next(iter(harness.backbone.eos_token_ids))
    free = harness.alone("abc", None, max_new_tokens=6)
    # pretend the third generated token is an end-of-sequence token (Backbone is frozen)
    object.__setattr__(harness.backbone, "eos_token_ids", frozenset({eos, token_ids(free)[2]}))
    stopped = harness.alone("abc", None, max_new_tokens=6)
    assert stopped.finish_reason is FinishReason.EOS
    assert token_ids(stopped) == token_ids(free)[:3]


def test_vote_ensemble_of_identical_members_equals_single(harness: Harness):
    harness.store.register_dir("prefix-copy", harness.tiny.adapters["prefix"])
    single = harness.alone("vote", "prefix", max_new_tokens=8)
    request = harness.request("vote", "prefix", "prefix-copy", "prompt_tuning", ensemble=EnsembleMode.VOTE)
    completion = harness.run(request)[0]
    assert completion.generated_text == single.generated_text  # two of three members agree
    assert [m.task_id for m in completion.members] == ["prefix", "prefix-copy", "prompt_tuning"]
    assert completion.members[0].generated_text == single.generated_text


def test_vote_tie_goes_to_higher_mean_logprob(harness: Harness):
    members = ("prefix", "prompt_tuning")
    # random weights often emit invalid UTF-8 (all U+FFFD): take an input whose two answers read differently
    for text in ("tie", "ab", "hello", "xyz", "0123", "q"):
        singles = [harness.alone(text, task, max_new_tokens=8) for task in members]
        if singles[0].generated_text != singles[1].generated_text:
            break
    assert singles[0].generated_text != singles[1].generated_text
    mean_logprob = [sum(t.logprob for t in s.tokens) / len(s.tokens) for s in singles]
    completion = harness.run(harness.request(text, *members, ensemble=EnsembleMode.VOTE))[0]
    assert completion.generated_text == singles[mean_logprob.index(max(mean_logprob))].generated_text


def test_mean_ensemble_of_identical_members_equals_single(harness: Harness):
    harness.store.register_dir("prefix-copy", harness.tiny.adapters["prefix"])
    single = harness.alone("mean", "prefix", max_new_tokens=8)
    completion = harness.run(harness.request("mean", "prefix", "prefix-copy", ensemble=EnsembleMode.MEAN))[0]
    assert token_ids(completion) == token_ids(single)
    assert completion.task_id is None and {m.generated_text for m in completion.members} == {single.generated_text}


def test_mean_ensemble_members_share_every_token(harness: Harness):
    request = harness.request("mean", "prefix", "prompt_tuning", "p_tuning_mlp", ensemble=EnsembleMode.MEAN)
    harness.run(request)
    assert len({tuple(row.output_ids) for row in request.rows}) == 1
    assert harness.is_idle()


def test_abort_frees_rows_and_task_references(harness: Harness):
    keep = harness.request("keep going", "prompt_tuning", max_new_tokens=6)
    doomed = harness.request("abort me", "prefix", "prefix_projection", ensemble=EnsembleMode.VOTE, max_new_tokens=50)
    harness.engine.add(keep)
    harness.engine.add(doomed)
    while doomed not in harness.engine.scheduler.running:
        harness.engine.step()
    harness.engine.step()
    refs = harness.engine.memory.num_task_refs()
    harness.engine.abort(doomed.request_id)
    assert harness.engine.memory.num_task_refs() == refs - 2  # both members' prefix tasks
    assert harness.engine.scheduler.running == [keep] and all(not row.block_ids for row in doomed.rows)
    while harness.engine.has_work():
        harness.engine.step()
    assert harness.is_idle()


def test_abort_of_waiting_request_removes_it(harness: Harness):
    request = harness.request("wait", "prefix")
    harness.engine.add(request)
    harness.engine.abort(request.request_id)
    assert not harness.engine.has_work() and harness.is_idle()


def test_step_failure_fails_running_requests_and_frees_everything(harness: Harness, monkeypatch):
    request = harness.request("boom", "prefix", max_new_tokens=20)
    harness.engine.add(request)
    harness.engine.step()

    def broken_run(*args, **kwargs):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(harness.engine.runner, "run", broken_run)
    with pytest.raises(RuntimeError):
        harness.engine.step()
    harness.engine.fail_running(RuntimeError("device fell over"))
    assert isinstance(harness.outputs[request.request_id][-1].error, RuntimeError)
    assert harness.is_idle()
    monkeypatch.undo()
    assert harness.alone("still serving", "prefix", max_new_tokens=3).generated_tokens == 3


def test_unreachable_caller_costs_only_its_own_request(harness: Harness):
    """A caller whose event loop closed makes its sink raise: that request is dropped, its batch mates go on."""

    def gone(output):
        raise RuntimeError("Event loop is closed")

    alone = harness.alone("mate", "prefix", max_new_tokens=6)
    mate = harness.request("mate", "prefix", max_new_tokens=6)
    orphan = harness.request("orphan", "prompt_tuning", max_new_tokens=50)
    orphan.sink = gone
    harness.engine.add(orphan)
    assert token_ids(harness.run(mate)[0]) == token_ids(alone)
    assert harness.is_idle() and harness.engine.leaving == []


def test_request_larger_than_batch_limits_is_refused_not_queued(tiny_llama, tmp_path):
    harness = Harness(tiny_llama, tmp_path / "store", max_batch_size=2)
    request = harness.request("x", "prefix", "prompt_tuning", "p_tuning_mlp", ensemble=EnsembleMode.VOTE)
    harness.engine.add(request)
    assert isinstance(harness.outputs[request.request_id][-1].error, InputTooLong)
    assert not harness.engine.has_work()


def test_full_waiting_queue_refuses_with_queue_full(tiny_llama, tmp_path):
    harness = Harness(tiny_llama, tmp_path / "store", max_waiting=2)
    requests = [harness.request("x", None) for _ in range(3)]
    for request in requests:
        harness.engine.add(request)
    assert isinstance(harness.outputs[requests[2].request_id][-1].error, QueueFull)
    assert len(harness.engine.scheduler.waiting) == 2


def test_non_finite_logits_fail_only_their_own_request(harness: Harness, monkeypatch):
    """A task whose values overflow the activations gives NaN logits: that request fails, its batch mates go on."""
    alone = harness.alone("mate", "prefix", max_new_tokens=6)
    mate = harness.request("mate", "prefix", max_new_tokens=6)
    doomed = [
        harness.request("boom", "prompt_tuning", do_sample=True, seed=3, max_new_tokens=6),
        harness.request("boom", "prefix", "prompt_tuning", ensemble=EnsembleMode.MEAN, max_new_tokens=6),
    ]
    real_run = harness.engine.runner.run

    def poisoned_run(chunks, readout, *args):
        result = real_run(chunks, readout, *args)
        logits = result.logits.clone()
        sampled = [chunk.row for chunk in chunks if chunk.is_last]
        for i, row in enumerate(sampled):
            if row.request in doomed and row.task_id == "prompt_tuning" and row.output_ids:
                logits[i, 0] = float("nan")
        return replace(result, logits=logits)

    monkeypatch.setattr(harness.engine.runner, "run", poisoned_run)
    for request in doomed:
        harness.engine.add(request)
    assert token_ids(harness.run(mate)[0]) == token_ids(alone)
    for request in doomed:
        error = harness.outputs[request.request_id][-1].error
        assert isinstance(error, GenerationFailed)
        assert "task 'prompt_tuning' version 1" in str(error) and "NaN or infinity" in str(error)
    assert harness.is_idle()
