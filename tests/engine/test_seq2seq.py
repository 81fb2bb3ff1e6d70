"""Encoder-decoder backbones (T5, BART) in the engine: a row's greedy tokens equal the uncached reference over
PEFT's forward (tests/seq2seq_fixtures.py) for every adapter kind, alone, mixed with every other kind and plain
rows, and joining mid-flight; and stay so when the pool is small enough to preempt and recompute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from server.engine.kinds import encoder_decoder
from server.engine.kinds.seq2seq import seq2seq_of
from server.engine.selfcheck import SelfCheckFailed, self_check
from server.engine.task_cache import TaskCache
from server.engine.types import Completion, EnsembleMode, FinishReason
from tests.engine.harness import Harness, token_ids
from tests.fixtures import TinyBackbone
from tests.seq2seq_fixtures import (
    SEQ2SEQ_ADAPTER_KINDS,
    SEQ2SEQ_ARCHS,
    build_tiny_seq2seq_backbone,
    greedy_seq2seq_logprobs,
    load_seq2seq_peft,
    seq2seq_config,
)

TASKS = (*SEQ2SEQ_ADAPTER_KINDS, None)
TEXTS = {
    "prompt_tuning": "hello world",
    "p_tuning_mlp": "a",
    "prefix": "the quick brown fox",
    "prefix_projection": "xy",
    None: "a plain row",
}
NEW_TOKENS = 10
VARIANTS: dict[str, dict[str, object]] = {
    "roomy": {},
    "small-pool": {"kv_cache_tokens": 96, "kv_block_size": 4},
}


@pytest.fixture(scope="module", params=SEQ2SEQ_ARCHS)
def seq2seq(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyBackbone:
    return build_tiny_seq2seq_backbone(request.param, tmp_path_factory.mktemp(f"s2s-engine-{request.param}"))


@pytest.fixture(scope="module")
def references(seq2seq: TinyBackbone) -> dict[str | None, tuple[list[int], list[float]]]:
    """Each task's reference tokens for its text, and their log-probabilities."""
    answers = {}
    for task in TASKS:
        model = load_seq2seq_peft(seq2seq.path, seq2seq.adapters[task] if task else None)
        input_ids = list(Harness.tokenizer_of(seq2seq)(TEXTS[task])["input_ids"])
        answers[task] = greedy_seq2seq_logprobs(model, input_ids, NEW_TOKENS, model.config.eos_token_id)
    return answers


@pytest.fixture(scope="module")
def expected(references: dict[str | None, tuple[list[int], list[float]]]) -> dict[str | None, list[int]]:
    """Each task's reference tokens for its text."""
    return {task: tokens for task, (tokens, _) in references.items()}


@pytest.fixture(params=list(VARIANTS))
def harness(seq2seq: TinyBackbone, tmp_path: Path, request: pytest.FixtureRequest) -> Harness:
    return Harness(seq2seq, tmp_path / "store", **VARIANTS[request.param])  # type: ignore[arg-type]


def test_the_backbone_is_served_as_seq2seq(harness: Harness):
    assert harness.backbone.kind.name == "seq2seq" and harness.backbone.fingerprint.is_encoder_decoder


@pytest.mark.parametrize("task", TASKS)
def test_greedy_tokens_equal_the_reference_for_each_kind(harness: Harness, expected, task: str | None):
    assert token_ids(harness.alone(TEXTS[task], task, max_new_tokens=NEW_TOKENS)) == expected[task]


def test_a_mixed_batch_equals_the_reference_in_logprobs_too(harness: Harness, references):
    check_mixed_batch(harness, references)
    assert harness.is_idle()


def test_a_mixed_batch_through_onednn_equals_the_reference(seq2seq: TinyBackbone, tmp_path: Path, references):
    """Every linear layer of the encoder, the decoder and its cross-attention through oneDNN (cpu_linears.py)."""
    harness = Harness(seq2seq, tmp_path / "store", **VARIANTS["small-pool"])  # type: ignore[arg-type]
    assert harness.through_onednn() > 0
    check_mixed_batch(harness, references)


def check_mixed_batch(harness: Harness, references: dict[str | None, tuple[list[int], list[float]]]) -> None:
    """Every task's row in one batch: its tokens and log-probabilities equal its reference's."""
    mixed = harness.run(*(harness.request(TEXTS[task], task, max_new_tokens=NEW_TOKENS) for task in TASKS))
    for task, completion in zip(TASKS, mixed, strict=True):
        tokens, logprobs = references[task]
        assert token_ids(completion) == tokens, task
        served = torch.tensor([token.logprob for token in completion.tokens])
        torch.testing.assert_close(served, torch.tensor(logprobs), rtol=0, atol=1e-4, msg=str(task))


def test_rows_joining_mid_flight_equal_the_reference(harness: Harness, expected):
    first = [harness.request(TEXTS[task], task, max_new_tokens=NEW_TOKENS) for task in TASKS[:2]]
    later = {2: [harness.request(TEXTS[t], t, max_new_tokens=NEW_TOKENS) for t in TASKS[2:4]],
             5: [harness.request(TEXTS[None], None, max_new_tokens=NEW_TOKENS)]}  # fmt: skip
    completions = harness.run(*first, later=later)
    order = [*TASKS[:2], *TASKS[2:4], None]
    assert {task: token_ids(c) for task, c in zip(order, completions, strict=True)} == expected


def test_the_references_differ_by_task(expected):
    """Every task answers differently, so a row served under another row's task (or none) would fail above."""
    assert len({tuple(tokens) for tokens in expected.values()}) == len(TASKS)


def test_a_small_pool_preempts_and_recomputes_exactly(seq2seq: TinyBackbone, tmp_path: Path, expected):
    harness = Harness(seq2seq, tmp_path / "store", kv_cache_tokens=40, kv_block_size=4)
    requests = [harness.request(TEXTS[task], task, max_new_tokens=NEW_TOKENS) for task in TASKS]
    completions = harness.run(*requests)
    assert harness.engine.num_preemptions > 0
    assert {task: token_ids(c) for task, c in zip(TASKS, completions, strict=True)} == expected


def test_the_self_check_passes_and_catches_a_lost_encoder_output(harness: Harness, monkeypatch: pytest.MonkeyPatch):
    assert self_check(harness.engine) >= 0

    def nothing_encoded(model: object, embeds: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(embeds)

    monkeypatch.setattr(encoder_decoder, "encode", nothing_encoded)
    with pytest.raises(SelfCheckFailed, match="self-check failed"):
        self_check(harness.engine)


def test_the_self_check_catches_an_engine_wrong_only_on_short_inputs(harness: Harness, monkeypatch: pytest.MonkeyPatch):
    """As a BART was once wrong on "hi" and right on "translate this": a check on one sentence would pass."""
    encode = encoder_decoder.encode

    def short_inputs_reversed(model: object, embeds: torch.Tensor) -> torch.Tensor:
        return encode(model, embeds.flip(0) if embeds.shape[0] <= 3 else embeds)

    monkeypatch.setattr(encoder_decoder, "encode", short_inputs_reversed)
    with pytest.raises(SelfCheckFailed, match=r"of the plain row \(2 input tokens\)"):
        self_check(harness.engine)


def test_the_self_check_holds_prefix_rows_to_the_backbones_cache(harness: Harness, monkeypatch: pytest.MonkeyPatch):
    """Its prefix rows' keys and values, lost (read as zeros), are caught: they are in the decoder's attention."""
    monkeypatch.setattr(TaskCache, "fill", lambda self, blocks, artifact: setattr(blocks, "is_filled", True))
    with pytest.raises(SelfCheckFailed, match=r"the prefix row"):
        self_check(harness.engine)
    assert harness.is_idle() and not harness.engine.memory.tasks


def test_seeded_sampling_is_the_same_alone_and_mixed(harness: Harness):
    sampling = {"do_sample": True, "temperature": 1.3, "top_k": 50, "top_p": 0.95, "seed": 1234, "max_new_tokens": 12}
    alone = token_ids(harness.alone("sample me", "prompt_tuning", **sampling))
    mates = [harness.request(TEXTS[task], task, do_sample=True, max_new_tokens=12) for task in TASKS]
    mixed = harness.run(*mates[:2], harness.request("sample me", "prompt_tuning", **sampling), *mates[2:])
    assert token_ids(mixed[2]) == alone


def printable_answer(harness: Harness) -> tuple[str, Completion, str]:
    """An input whose answer (under the prefix task) has a printable character after its first: a stop for it."""
    for text in ("abc", "hello world", "the quick brown fox", "xy", "a plain row"):
        free = harness.alone(text, "prefix", max_new_tokens=12)
        printable = [c for c in free.generated_text[1:] if c.isprintable() and c != "\ufffd"]
        if printable:
            return text, free, printable[0]
    raise AssertionError("the fixture says nothing printable under its prefix task")


def test_stop_sequences_and_both_ensemble_modes(harness: Harness):
    text, free, stop = printable_answer(harness)
    stopped = harness.alone(text, "prefix", max_new_tokens=12, stop=(stop,))
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.generated_text == free.generated_text[: free.generated_text.index(stop)]
    harness.store.register_dir("prefix-copy", harness.tiny.adapters["prefix"])
    vote = harness.run(harness.request(text, "prefix", "prefix-copy", "prompt_tuning", ensemble=EnsembleMode.VOTE,
                                       max_new_tokens=12))[0]  # fmt: skip
    assert vote.generated_text == free.generated_text  # two of three members agree
    mean = harness.run(harness.request(text, "prefix", "prefix-copy", ensemble=EnsembleMode.MEAN,
                                       max_new_tokens=12))[0]  # fmt: skip
    assert token_ids(mean) == token_ids(free)


def test_encoders_count_against_the_step_budget(seq2seq: TinyBackbone, tmp_path: Path, monkeypatch, expected):
    """A step starts encoders only within max_batch_tokens, unless one is the first to start in it."""
    harness = Harness(seq2seq, tmp_path / "store", max_batch_tokens=16)
    encoded: list[list[int]] = []
    real_encode = encoder_decoder.encode

    def counting(model: object, embeds: torch.Tensor) -> torch.Tensor:
        encoded[-1].append(embeds.shape[0])
        return real_encode(model, embeds)

    monkeypatch.setattr(encoder_decoder, "encode", counting)
    requests = [harness.request(TEXTS[task], task, max_new_tokens=NEW_TOKENS) for task in TASKS]
    for request in requests:
        harness.engine.add(request)
    while harness.engine.has_work():
        encoded.append([])
        harness.step()
    started = [lengths for lengths in encoded if lengths]
    assert len(started) > 1, "five encoders of 5 to 24 tokens cannot all start in one 16-token step"
    assert all(len(lengths) == 1 or sum(lengths) + len(lengths) <= 16 for lengths in started)
    completions = [harness.completion(request.request_id) for request in requests]
    assert {task: token_ids(c) for task, c in zip(TASKS, completions, strict=True)} == expected


def test_a_decoder_with_other_heads_than_its_encoder_is_refused_at_load():
    config = seq2seq_config("bart")
    config.decoder_attention_heads = 2
    with pytest.raises(ValueError, match="same attention heads"):
        seq2seq_of(AutoModelForSeq2SeqLM.from_config(config))
