"""A fault stays with the request that caused it: a failure injected into one request's task loading, head, scoring,
sampling or token ids fails that request (and its ensemble siblings) alone, while batch mates that are mid-stream
finish with the tokens they have alone."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from server.engine import engine as engine_module
from server.engine import task_cache
from server.engine.backbone import load_backbone
from server.engine.errors import GenerationFailed, UnknownToken
from server.engine.intake import build_request
from server.engine.nlu import plan_classify, plan_score
from server.engine.request import Request
from server.engine.types import ClassifyInput, EngineOutput, EnsembleMode, GenerateInput, SamplingParams, ScoreInput
from tests.engine.harness import Harness, token_ids
from tests.fixtures import TinyBackbone
from tests.nlu_fixtures import write_nlu_adapter

VARIANTS = {"prompts-as-kv": {}, "prompts-as-embeddings": {"cache_prompt_kv": False, "max_batch_tokens": 5}}


@pytest.fixture(params=list(VARIANTS))
def harness(tiny_llama: TinyBackbone, tmp_path: Path, request: pytest.FixtureRequest) -> Harness:
    return Harness(tiny_llama, tmp_path / "store", **VARIANTS[request.param])  # type: ignore[arg-type]


class Mates:
    """Requests already running when the fault arrives: a greedy prefix row, a seeded sampled prompt row, a plain
    row. Each must end with the tokens it has alone."""

    SPECS: tuple[tuple[str, str | None, dict[str, Any]], ...] = (
        ("mate one", "prefix", {}),
        ("mate two", "prompt_tuning", {"do_sample": True, "seed": 7}),
        ("mate three", None, {}),
    )

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.alone = [token_ids(harness.alone(text, task, max_new_tokens=12, **kw)) for text, task, kw in self.SPECS]
        self.requests = [harness.request(text, task, max_new_tokens=12, **kw) for text, task, kw in self.SPECS]
        for request in self.requests:
            harness.engine.add(request)
        while not all(request.rows[0].output_ids for request in self.requests):  # until each is mid-stream
            harness.step()

    def finish_unchanged(self) -> None:
        harness = self.harness
        while harness.engine.has_work():
            harness.step()
        assert [token_ids(harness.completion(r.request_id)) for r in self.requests] == self.alone
        assert harness.is_idle() and harness.engine.leaving == []


def error_of(harness: Harness, request: Request) -> Exception | None:
    return harness.outputs[request.request_id][-1].error


def test_a_task_that_fails_to_load_fails_only_its_own_requests(harness: Harness, monkeypatch: pytest.MonkeyPatch):
    real = task_cache.materialize

    def failing(artifact: Any, *args: Any) -> Any:
        if artifact.record.task_id == "p_tuning_mlp":
            raise RuntimeError("CUDA out of memory (injected)")
        return real(artifact, *args)

    mates = Mates(harness)
    monkeypatch.setattr(task_cache, "materialize", failing)
    alone = harness.request("doomed", "p_tuning_mlp")
    ensemble = harness.request("doomed too", "prefix", "p_tuning_mlp", ensemble=EnsembleMode.VOTE)
    harness.engine.add(alone)
    harness.engine.add(ensemble)
    mates.finish_unchanged()
    for request in (alone, ensemble):
        error = error_of(harness, request)
        assert isinstance(error, GenerationFailed)
        assert "loading task 'p_tuning_mlp' version 1" in str(error) and "CUDA out of memory" in str(error)
    monkeypatch.setattr(task_cache, "materialize", real)
    assert harness.alone("later", "p_tuning_mlp", max_new_tokens=3).generated_tokens == 3  # nothing half-loaded


def test_a_failing_sampler_fails_only_its_own_request(harness: Harness, monkeypatch: pytest.MonkeyPatch):
    """The batch's sampling fails; it is retried request by request with the draws the batch made, so a sampled
    mate draws what it draws alone."""
    real = engine_module.sample
    mates = Mates(harness)
    doomed = harness.request("doomed", "prefix", do_sample=True, seed=1, top_p=0.5)

    def failing(logits: torch.Tensor, rows: list[Any], uniforms: torch.Tensor) -> Any:
        result = real(logits, rows, uniforms)  # computes first: nothing it made may outlive the failure
        if any(row.request is doomed for row in rows):
            raise RuntimeError("invalid multinomial distribution (injected)")
        return result

    monkeypatch.setattr(engine_module, "sample", failing)
    harness.engine.add(doomed)
    mates.finish_unchanged()
    error = error_of(harness, doomed)
    assert isinstance(error, GenerationFailed) and "sampling the next token" in str(error)


def test_a_failing_score_fails_only_its_own_request(harness: Harness):
    mates = Mates(harness)
    outputs: list[EngineOutput] = []
    doomed = plan_score(
        ScoreInput("is it?", ("yes",)), harness.backbone, harness.store, harness.intake, [outputs.append]
    )
    harness.engine.add_all(doomed)
    doomed[0].rows[0].targets[-1] = harness.backbone.num_token_ids + 3  # a corrupt target after intake
    mates.finish_unchanged()
    assert isinstance(outputs[-1].error, GenerationFailed) and "scoring the candidate" in str(outputs[-1].error)


@pytest.fixture
def classifier(harness: Harness, tmp_path: Path) -> str:
    adapter = write_nlu_adapter(harness.tiny.path, "seq", "prompt_tuning", tmp_path / "cls", 4, seed=0)
    harness.store.register_dir("cls", adapter)
    return "cls"


def test_a_failing_head_fails_only_its_own_request(harness: Harness, classifier: str, monkeypatch: pytest.MonkeyPatch):
    def failing(self: Any, artifact: Any) -> Any:
        raise RuntimeError("head tensors could not be moved to the device (injected)")

    mates = Mates(harness)
    outputs: list[EngineOutput] = []
    plan = plan_classify(ClassifyInput(("x",), (classifier,)), harness.backbone, harness.store, harness.intake,
                         [outputs.append])  # fmt: skip
    monkeypatch.setattr(task_cache.TaskCache, "head_of", failing)
    harness.engine.add_all(plan.requests)
    mates.finish_unchanged()
    assert isinstance(outputs[-1].error, GenerationFailed) and "task 'cls' version 1's head" in str(outputs[-1].error)


def test_a_row_with_nan_logits_fails_only_its_own_request(harness: Harness, monkeypatch: pytest.MonkeyPatch):
    mates = Mates(harness)
    doomed = harness.request("nan", "prefix", "prompt_tuning", ensemble=EnsembleMode.VOTE)
    real_run = harness.engine.runner.run

    def poisoned(chunks: Any, readout: Any, *args: Any) -> Any:
        result = real_run(chunks, readout, *args)
        logits = result.logits.clone()
        for i, row in enumerate(readout.sampled):
            if row.request is doomed and row.task_id == "prompt_tuning":
                logits[i, 3] = float("nan")
        return replace(result, logits=logits)

    monkeypatch.setattr(harness.engine.runner, "run", poisoned)
    harness.engine.add(doomed)
    mates.finish_unchanged()
    assert isinstance(error_of(harness, doomed), GenerationFailed)


def test_a_token_the_model_cannot_read_is_refused_by_the_engine_alone(harness: Harness):
    """A request that reached the engine around intake with an id past the embedding table: refused on arrival,
    before it could fail the shared pass."""
    mates = Mates(harness)
    doomed = harness.request("bad id", "prefix")
    doomed.input_ids[-1] = harness.backbone.num_token_ids
    harness.engine.add(doomed)
    assert isinstance(error_of(harness, doomed), UnknownToken)
    mates.finish_unchanged()


# ---- a tokenizer with a token more than its model: named at start, refused at intake


@pytest.fixture
def widened(tiny_llama: TinyBackbone, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "widened"
    shutil.copytree(tiny_llama.path, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens(["<extra>"], special_tokens=True)  # no resize_token_embeddings: the common mistake
    tokenizer.save_pretrained(path)
    yield path


def test_a_tokenizer_wider_than_the_model_is_named_at_start(widened: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="server.engine.backbone"):
        backbone = load_backbone(str(widened), "cpu", "float32")
    extra = backbone.num_token_ids
    assert f"{extra} ('<extra>')" in caplog.text and "cannot read" in caplog.text


def test_a_token_the_model_cannot_read_is_refused_at_intake_naming_it(
    widened: Path, tiny_llama: TinyBackbone, tmp_path: Path
):
    harness = Harness(tiny_llama, tmp_path / "store")
    backbone = load_backbone(str(widened), "cpu", "float32")
    generate = GenerateInput("hi <extra>", (None,), sampling=SamplingParams(max_new_tokens=2))
    with pytest.raises(UnknownToken, match=rf"found token {backbone.num_token_ids} \('<extra>'\)"):
        build_request(generate, backbone, harness.store, harness.intake, harness.sink)


def test_a_request_failed_in_a_step_whose_shared_pass_then_fails_keeps_its_own_error(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
):
    def failing(artifact: Any, *args: Any) -> Any:
        raise RuntimeError("CUDA out of memory (injected)")

    def broken_run(*args: Any) -> Any:
        raise RuntimeError("device fell over")

    mate = harness.request("mate", None, max_new_tokens=20)
    harness.engine.add(mate)
    harness.step()
    doomed = harness.request("doomed", "p_tuning_mlp")
    harness.engine.add(doomed)
    monkeypatch.setattr(task_cache, "materialize", failing)
    monkeypatch.setattr(harness.engine.runner, "run", broken_run)
    with pytest.raises(RuntimeError, match="device fell over"):
        harness.engine.step()
    harness.engine.fail_running(RuntimeError("device fell over"))
    assert [str(output.error) for output in harness.outputs[doomed.request_id] if output.error] == [
        str(error_of(harness, doomed))
    ] and "CUDA out of memory" in str(error_of(harness, doomed))
    assert "device fell over" in str(error_of(harness, mate))
    assert harness.is_idle() and harness.engine.leaving == []
