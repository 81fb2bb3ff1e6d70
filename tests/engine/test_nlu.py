"""Classification and scoring in the engine (issue 13): probabilities equal PEFT's own forward (float32, 1e-5) for
every encoder and every adapter kind PEFT can apply, with every task's rows in the same steps; a causal LM's
SEQ_CLS task reads its last token; scores equal an uncached forward's log-probabilities, causal and seq2seq, with
prefills chunked across steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prompt_store.registry import TaskStore
from server.engine.backbone import Backbone, load_backbone
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.errors import WrongKind
from server.engine.intake import IntakeConfig
from server.engine.nlu import Results, plan_classify, plan_score, predictions, scores
from server.engine.request import Request
from server.engine.selfcheck import SelfCheckFailed, self_check
from server.engine.types import ClassifyInput, EngineOutput, EnsembleMode, ScoreInput, StepStats, TokenLabel
from tests.engine.harness import through_onednn
from tests.fixtures import TinyBackbone
from tests.nlu_fixtures import (
    NLU_ARCHS,
    NLU_VIRTUAL_TOKENS,
    load_nlu_peft,
    nlu_kinds,
    nlu_reference,
    peft_logits,
    write_nlu_adapter,
    write_nlu_backbone,
)
from tests.seq2seq_fixtures import build_tiny_seq2seq_backbone, load_seq2seq_peft

TEXTS = ("Hello world", "ok", "a longer input, with punctuation!")
LIMITS = IntakeConfig(max_input_tokens=256, max_new_tokens=256, prompts_as_kv=True)
ATOL = 1e-5


class Driver:
    """A real engine over a real store, stepped synchronously; results collected per engine request."""

    def __init__(self, backbone: Backbone, store: TaskStore, **config: Any) -> None:
        self.backbone, self.store = backbone, store
        defaults = {"device": "cpu", "dtype": "float32", "kv_cache_bytes": 1 << 24, "max_batch_tokens": 4096}
        self.engine = Engine(backbone, EngineConfig(**{**defaults, **config}))
        self.steps: list[StepStats] = []
        self.engine.step_listeners.append(self.steps.append)

    def sinks(self, count: int) -> tuple[list[Callable[[EngineOutput], None]], list[Results]]:
        results: list[Results] = [{} for _ in range(count)]

        def sink_of(i: int) -> Callable[[EngineOutput], None]:
            def sink(output: EngineOutput) -> None:
                if output.error is not None:
                    raise output.error
                results[i].update({result.row: result for result in output.results})

            return sink

        return [sink_of(i) for i in range(count)], results

    def classify(self, request: ClassifyInput) -> Callable[[], tuple]:
        """Queue the request; call the returned function after `run` for its predictions."""
        sinks, results = self.sinks(len(request.inputs))
        plan = plan_classify(request, self.backbone, self.store, LIMITS, sinks)
        self.engine.add_all(plan.requests)
        return lambda: predictions(plan, request.inputs, results, request.top_k)

    def classify_probs(self, text: str, task_id: str | None) -> Callable[[], torch.Tensor]:
        sinks, results = self.sinks(1)
        plan = plan_classify(ClassifyInput((text,), (task_id,)), self.backbone, self.store, LIMITS, sinks)
        self.engine.add_all(plan.requests)
        return lambda: results[0][0].probs

    def score(self, request: ScoreInput) -> Callable[[], Any]:
        sinks, results = self.sinks(len(request.candidates))
        requests: list[Request] = plan_score(request, self.backbone, self.store, LIMITS, sinks)
        self.engine.add_all(requests)
        return lambda: scores(request.candidates, results, requests[0].num_input_tokens)

    def run(self) -> None:
        while self.engine.has_work():
            self.engine.step()
        assert self.engine.is_idle()


@pytest.fixture(scope="module", params=[(arch, head) for arch in NLU_ARCHS for head in ("seq", "token")],
                ids=lambda p: f"{p[0]}-{p[1]}")  # fmt: skip
def encoder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    arch, head = request.param
    root = tmp_path_factory.mktemp(f"nlu-engine-{arch}-{head}")
    backbone_dir = write_nlu_backbone(arch, root / "backbone", head=head)
    adapters = {
        kind: write_nlu_adapter(backbone_dir, head, kind, root / kind, NLU_VIRTUAL_TOKENS[kind], seed=seed)
        for seed, kind in enumerate(nlu_kinds(arch))
    }
    backbone = load_backbone(str(backbone_dir), "cpu", "float32")
    store = TaskStore(root / "store", backbone.fingerprint)
    for kind, adapter in adapters.items():
        store.register_dir(kind, adapter)
    reference = {kind: nlu_reference(backbone_dir, adapters.get(kind), list(TEXTS), head) for kind in (None, *adapters)}
    return {"arch": arch, "head": head, "backbone": backbone, "store": store, "reference": reference,
            "dir": backbone_dir}  # fmt: skip


def test_every_kind_mixed_in_shared_steps_equals_peft(encoder: dict[str, Any]) -> None:
    backbone, reference = encoder["backbone"], encoder["reference"]
    assert backbone.kind.name == "encoder"
    assert backbone.kind.packed == (encoder["arch"] != "deberta_v2")  # DeBERTa's attention is its own
    driver = Driver(backbone, encoder["store"])
    answers = {(kind, text): driver.classify_probs(text, kind) for kind in reference for text in TEXTS}
    driver.run()
    assert driver.steps[0].batch_size == len(answers) and driver.steps[0].num_distinct_tasks == len(reference) - 1
    for (kind, text), answer in answers.items():
        expected = reference[kind][TEXTS.index(text)]
        got = answer()
        if encoder["head"] == "token":  # PEFT keeps a prompt's virtual rows first; the answer has input tokens only
            expected = expected[-got.shape[0] :]
        torch.testing.assert_close(got, expected, rtol=0, atol=ATOL, msg=f"{kind} on {text!r}")


def test_every_kind_through_onednn_equals_peft(encoder: dict[str, Any]) -> None:
    """Every linear layer of the encoder's shared pass through oneDNN (cpu_linears.py); its heads as they were."""
    backbone, reference = load_backbone(str(encoder["dir"]), "cpu", "float32"), encoder["reference"]
    assert through_onednn(backbone) > 0
    driver = Driver(backbone, encoder["store"])
    answers = {(kind, text): driver.classify_probs(text, kind) for kind in reference for text in TEXTS}
    driver.run()
    for (kind, text), answer in answers.items():
        expected, got = reference[kind][TEXTS.index(text)], answer()
        if encoder["head"] == "token":
            expected = expected[-got.shape[0] :]
        torch.testing.assert_close(got, expected, rtol=0, atol=ATOL, msg=f"{kind} on {text!r}")


def test_answers_are_labelled_and_ensembles_average(encoder: dict[str, Any]) -> None:
    backbone, reference = encoder["backbone"], encoder["reference"]
    members = tuple(kind for kind in reference if kind is not None)[:2]
    driver = Driver(backbone, encoder["store"])
    top_k = 2 if encoder["head"] == "seq" else None  # a token task answers each token's best label
    single = driver.classify(ClassifyInput(TEXTS, (members[0],), top_k=top_k))
    ensemble = driver.classify(ClassifyInput(TEXTS, members, EnsembleMode.MEAN))
    driver.run()
    tokenizer = backbone.tokenizer
    for i, (one, mean) in enumerate(zip(single(), ensemble(), strict=True)):
        expected = torch.stack([reference[m][i][-len(tokenizer(TEXTS[i])["input_ids"]) :] for m in members]).mean(0)
        if encoder["head"] == "seq":
            assert [entry.score for entry in one] == sorted((entry.score for entry in one), reverse=True)
            assert len(one) == 2 and {entry.label for entry in mean} == {"LABEL_0", "LABEL_1", "LABEL_2"}
            for entry in mean:
                assert abs(entry.score - float(expected[int(entry.label.removeprefix("LABEL_"))])) < ATOL
        else:
            assert all(isinstance(entry, TokenLabel) for entry in mean)
            assert [entry.start for entry in mean] == sorted(entry.start for entry in mean)  # in input order
            assert {entry.start for entry in mean} == set(range(len(TEXTS[i])))  # every character (ASCII: a byte)
            for entry in mean:
                assert TEXTS[i][entry.start : entry.end] == entry.token
            scores_ = [entry.score for entry in mean]
            assert max(abs(s - float(p.max())) for s, p in zip(scores_, expected[1:-1], strict=True)) < ATOL


def test_a_generation_task_or_encoder_is_the_wrong_kind(encoder: dict[str, Any], tiny_llama: TinyBackbone) -> None:
    driver = Driver(encoder["backbone"], encoder["store"])
    with pytest.raises(WrongKind, match=r"expected a generative backbone .* use /v1/classify"):
        driver.score(ScoreInput("hi", ("a",)))


# ---- a causal LM: SEQ_CLS on its last token, and scoring


@pytest.fixture(scope="module")
def causal(tiny_llama: TinyBackbone, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("nlu-causal")
    classifiers = {
        kind: write_nlu_adapter(tiny_llama.path, "seq", kind, root / kind, 4, seed=seed)
        for seed, kind in enumerate(("prompt_tuning", "prefix_projection"))
    }
    backbone = load_backbone(str(tiny_llama.path), "cpu", "float32")
    store = TaskStore(root / "store", backbone.fingerprint)
    for kind, adapter in classifiers.items():
        store.register_dir(f"cls-{kind}", adapter)
    for kind, adapter in tiny_llama.adapters.items():
        store.register_dir(kind, adapter)
    return {"backbone": backbone, "store": store, "classifiers": classifiers, "tiny": tiny_llama}


def test_a_causal_sequence_task_reads_the_last_token_across_chunked_steps(causal: dict[str, Any]) -> None:
    driver = Driver(causal["backbone"], causal["store"], max_batch_tokens=7)  # every input prefills over steps
    answers = {
        (kind, text): driver.classify_probs(text, f"cls-{kind}") for kind in causal["classifiers"] for text in TEXTS
    }
    driver.run()
    tokenizer = AutoTokenizer.from_pretrained(causal["tiny"].path)
    for (kind, text), answer in answers.items():
        model = load_nlu_peft(causal["tiny"].path, "seq", causal["classifiers"][kind])
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        expected = torch.softmax(peft_logits(model, ids, torch.ones_like(ids)).float(), dim=-1)[0]
        torch.testing.assert_close(answer(), expected, rtol=0, atol=ATOL, msg=f"{kind} on {text!r}")


def test_a_classification_task_is_refused_where_generation_tasks_go(causal: dict[str, Any]) -> None:
    driver = Driver(causal["backbone"], causal["store"])
    with pytest.raises(WrongKind, match="expected CAUSAL_LM tasks on /v1/score; task 'cls-prompt_tuning' is a SEQ_CLS"):
        driver.score(ScoreInput("hi", ("a",), ("cls-prompt_tuning",)))
    with pytest.raises(WrongKind, match="task 'prefix' is a CAUSAL_LM task: use /v1/generate"):
        driver.classify(ClassifyInput(("hi",), ("prefix",)))
    with pytest.raises(WrongKind, match="no trained classification head of its own"):
        driver.classify(ClassifyInput(("hi",)))


CANDIDATES = ("yes", "no way", "x")


@torch.no_grad()
def causal_candidate_logprobs(tiny: TinyBackbone, kind: str | None, text: str) -> list[list[float]]:
    """Each candidate's token log-probabilities from one uncached forward of PEFT's model (for a prefix, what PEFT's
    forward would run on transformers 5.24: see tests/nlu_fixtures.py)."""
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(tiny.path)
    base = AutoModelForCausalLM.from_pretrained(tiny.path).eval()
    model = base if kind is None else PeftModel.from_pretrained(base, tiny.adapters[kind]).eval()
    prompt = tokenizer(text)["input_ids"]
    out = []
    for candidate in CANDIDATES:
        targets = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + targets])
        logits = peft_logits(model, ids, torch.ones_like(ids)) if kind else model(input_ids=ids).logits
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        first = logits.shape[1] - ids.shape[1] + len(prompt) - 1  # after a prompt task's virtual rows
        out.append([float(logprobs[first + j, token]) for j, token in enumerate(targets)])
    return out


@pytest.mark.parametrize("kind", [None, "prompt_tuning", "p_tuning_lstm", "prefix"])
def test_causal_scores_equal_an_uncached_forward(causal: dict[str, Any], kind: str | None) -> None:
    driver = Driver(causal["backbone"], causal["store"], max_batch_tokens=5, kv_block_size=4)
    answer = driver.score(ScoreInput("Is it true?", CANDIDATES, (kind,)))
    mate = driver.score(ScoreInput("another input entirely", ("no",), ("prefix_projection",)))
    driver.run()
    result, expected = answer(), causal_candidate_logprobs(causal["tiny"], kind, "Is it true?")
    assert mate().scores[0].num_tokens == 2  # byte tokens: "n", "o"
    for score, tokens in zip(result.scores, expected, strict=True):
        assert score.num_tokens == len(tokens)
        assert abs(score.logprob - sum(tokens)) < 1e-4 and abs(score.mean_logprob - sum(tokens) / len(tokens)) < 1e-4
    assert result.best == max(result.scores, key=lambda s: s.logprob).candidate


def test_an_ensemble_score_averages_the_members(causal: dict[str, Any]) -> None:
    driver = Driver(causal["backbone"], causal["store"])
    members = ("prompt_tuning", "prefix")
    ensemble = driver.score(ScoreInput("Is it true?", CANDIDATES, members))
    driver.run()
    per_member = [causal_candidate_logprobs(causal["tiny"], kind, "Is it true?") for kind in members]
    for i, score in enumerate(ensemble().scores):
        assert abs(score.logprob - sum(sum(m[i]) for m in per_member) / 2) < 1e-4


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> TinyBackbone:
    return build_tiny_seq2seq_backbone("t5", tmp_path_factory.mktemp("nlu-t5"))


@pytest.mark.parametrize("kind", [None, "prompt_tuning", "prefix"])
@torch.no_grad()
def test_seq2seq_scores_equal_an_uncached_forward(t5: TinyBackbone, tmp_path: Path, kind: str | None) -> None:
    backbone = load_backbone(str(t5.path), "cpu", "float32")
    store = TaskStore(tmp_path / "store", backbone.fingerprint)
    for name, adapter in t5.adapters.items():
        store.register_dir(name, adapter)
    driver = Driver(backbone, store, max_batch_tokens=3)
    answer = driver.score(ScoreInput("translate this", CANDIDATES, (kind,)))
    driver.run()
    model = load_seq2seq_peft(t5.path, t5.adapters[kind] if kind else None)
    tokenizer = backbone.tokenizer
    encoder_ids = torch.tensor([tokenizer("translate this")["input_ids"]])
    for candidate, score in zip(CANDIDATES, answer().scores, strict=True):
        targets = tokenizer(candidate)["input_ids"]  # a seq2seq target as the tokenizer makes it: with </s>
        decoder = torch.tensor([[model.config.decoder_start_token_id, *targets[:-1]]])
        logits = model(input_ids=encoder_ids, decoder_input_ids=decoder, use_cache=False).logits
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        expected = sum(float(logprobs[j, token]) for j, token in enumerate(targets))
        tolerance = 1e-4 * len(targets)  # each token's log-probability within 1e-4
        assert score.num_tokens == len(targets) and abs(score.logprob - expected) < tolerance, candidate


def test_the_self_check_passes_on_every_encoder_and_catches_wrong_positions(encoder: dict[str, Any]) -> None:
    backbone = encoder["backbone"]
    assert self_check(Driver(backbone, encoder["store"]).engine) > 0
    if encoder["arch"] == "roberta":  # positions counted from 0, not from padding_idx + 1 as RoBERTa's are
        broken = replace(backbone, kind=replace(backbone.kind, first_position=0))
        with pytest.raises(SelfCheckFailed, match="the plain row's hidden states differ from the backbone's"):
            self_check(Driver(broken, encoder["store"]).engine)
