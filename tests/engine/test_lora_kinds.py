"""LoRA and IA3 on the other backbone kinds (issue 27): an encoder-decoder's (T5, BART) in its encoder, its decoder
and its cross-attention, and an encoder's (BERT) SEQ_CLS task with its classifier from PEFT's `modules_to_save`;
each row equal to PEFT's own forward for its adapter alone, mixed with prompt and prefix rows and bare rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from prompt_store.registry import TaskStore
from server.engine.backbone import load_backbone
from server.engine.nlu import plan_classify
from server.engine.types import ClassifyInput
from tests.engine.harness import Harness, token_ids
from tests.engine.test_nlu import LIMITS, Driver
from tests.fixtures import TinyBackbone
from tests.lora_fixtures import write_module_adapter
from tests.nlu_fixtures import encoder_tokenizer, load_nlu_peft, peft_logits, write_nlu_adapter, write_nlu_backbone
from tests.seq2seq_fixtures import build_tiny_seq2seq_backbone, greedy_seq2seq_logprobs, load_seq2seq_peft

SEQ2SEQ_ADAPTERS = {
    "t5": {
        "lora": {"method": "lora", "target_modules": ["q", "v", "wo"], "r": 4},  # v: the cross-attention's too
        "ia3": {"method": "ia3", "target_modules": ["k", "v", "wo"], "feedforward_modules": ["wo"]},
    },
    "bart": {
        "lora": {"method": "lora", "target_modules": ["q_proj", "v_proj", "fc2"], "r": 4},
        # v_proj scaled at its input: the cross-attention's is the encoder output (a scaled copy of another stream)
        "ia3": {
            "method": "ia3",
            "target_modules": ["k_proj", "v_proj", "fc2"],
            "feedforward_modules": ["fc2", "v_proj"],
        },
    },
}
TEXTS = {"lora": "hello world", "ia3": "the quick brown fox", "prefix": "xy", "prompt_tuning": "a", None: "plain"}
NEW_TOKENS = 8


@pytest.fixture(scope="module", params=list(SEQ2SEQ_ADAPTERS))
def seq2seq(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyBackbone:
    root = tmp_path_factory.mktemp(f"lora-s2s-{request.param}")
    tiny = build_tiny_seq2seq_backbone(request.param, root)
    for seed, (name, settings) in enumerate(SEQ2SEQ_ADAPTERS[request.param].items()):
        tiny.adapters[name] = write_module_adapter(
            tiny.path, settings["method"], root / name, seed=seed, auto=AutoModelForSeq2SeqLM,
            task_type="SEQ_2_SEQ_LM", **{k: v for k, v in settings.items() if k != "method"},
        )  # fmt: skip
    return tiny


@pytest.fixture(scope="module")
def seq2seq_references(seq2seq: TinyBackbone) -> dict[str | None, tuple[list[int], list[float]]]:
    answers = {}
    for task, text in TEXTS.items():
        model = load_seq2seq_peft(seq2seq.path, seq2seq.adapters[task] if task else None)
        input_ids = list(Harness.tokenizer_of(seq2seq)(text)["input_ids"])
        answers[task] = greedy_seq2seq_logprobs(model, input_ids, NEW_TOKENS, model.config.eos_token_id)
    return answers


def check(completion: Any, reference: tuple[list[int], list[float]], what: object) -> None:
    tokens, logprobs = reference
    assert token_ids(completion) == tokens, what
    served = torch.tensor([token.logprob for token in completion.tokens])
    torch.testing.assert_close(served, torch.tensor(logprobs), rtol=0, atol=1e-4, msg=str(what))


def test_seq2seq_adapters_change_the_answers(seq2seq_references: dict) -> None:
    for task in ("lora", "ia3"):
        tokens, logprobs = seq2seq_references[task]
        bare = greedy_bare = seq2seq_references[None]
        assert tokens != bare[0] or abs(logprobs[0] - greedy_bare[1][0]) > 1e-2, task


@pytest.mark.parametrize("variant", [{}, {"kv_cache_tokens": 96, "kv_block_size": 4}], ids=["roomy", "small-pool"])
def test_seq2seq_rows_of_every_kind_mixed_equal_peft(
    seq2seq: TinyBackbone, seq2seq_references: dict, tmp_path: Path, variant: dict[str, Any]
) -> None:
    harness = Harness(seq2seq, tmp_path / "store", **variant)
    tasks = list(TEXTS)
    completions = harness.run(*(harness.request(TEXTS[t], t, max_new_tokens=NEW_TOKENS) for t in tasks))
    for task, completion in zip(tasks, completions, strict=True):
        check(completion, seq2seq_references[task], task)
    later = {2: [harness.request(TEXTS["ia3"], "ia3", max_new_tokens=NEW_TOKENS)]}
    completions = harness.run(harness.request(TEXTS["lora"], "lora", max_new_tokens=NEW_TOKENS), later=later)
    check(completions[0], seq2seq_references["lora"], "lora")
    check(completions[1], seq2seq_references["ia3"], "ia3 joining mid-flight")
    assert harness.is_idle() and not harness.engine.tasks.adapters.slots.holds


LORA_ENCODERS = ("bert", "deberta_v2")  # docs/models.md lists LoRA and IA3 on these (tests/architectures.py)


@pytest.fixture(scope="module", params=LORA_ENCODERS)
def encoder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """BERT runs its rows packed through the engine's attention; DeBERTa-v2 right-padded into one batch."""
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    path = write_nlu_backbone(request.param, root / request.param)
    auto = AutoModelForSequenceClassification
    adapters = {
        "lora": write_module_adapter(path, "lora", root / "lora", seed=1, auto=auto, task_type="SEQ_CLS",
                                     target_modules=r".*\.(query|query_proj|value|value_proj|attention\.output\.dense)"),
        "ia3": write_module_adapter(path, "ia3", root / "ia3", seed=2, auto=auto, task_type="SEQ_CLS",
                                    target_modules=["key", "key_proj", "intermediate.dense", "output.dense"],
                                    feedforward_modules=["intermediate.dense"]),
        "prompt_tuning": write_nlu_adapter(path, "seq", "prompt_tuning", root / "prompt", 4, seed=3),
    }  # fmt: skip
    backbone = load_backbone(str(path), "cpu", "float32")
    store = TaskStore(root / "store", backbone.fingerprint)
    for name, directory in adapters.items():
        store.register_dir(name, directory)
    return {"path": path, "adapters": adapters, "backbone": backbone, "store": store}


@torch.no_grad()
def test_encoder_seq_cls_lora_and_ia3_equal_peft_mixed(encoder: dict[str, Any]) -> None:
    """Each task's probabilities equal its PEFT SequenceClassification model's (with the classifier PEFT saved
    through modules_to_save), every task's rows in the same steps."""
    tokenizer = encoder_tokenizer()
    texts = ("Hello world", "a longer input, with punctuation!")
    tasks = ["lora", "ia3", "prompt_tuning"]
    driver = Driver(encoder["backbone"], encoder["store"])
    pending = {}
    for task in tasks:
        sinks, results = driver.sinks(len(texts))
        plan = plan_classify(ClassifyInput(texts, (task,)), driver.backbone, driver.store, LIMITS, sinks)
        driver.engine.add_all(plan.requests)
        pending[task] = results
    while driver.engine.has_work():
        driver.engine.step()
    bare = load_nlu_peft(encoder["path"], "seq", None)
    for task in tasks:
        model = load_nlu_peft(encoder["path"], "seq", encoder["adapters"][task])
        for i, text in enumerate(texts):
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            expected = torch.softmax(peft_logits(model, ids, torch.ones_like(ids)).float(), -1)[0]
            unadapted = torch.softmax(peft_logits(bare, ids, torch.ones_like(ids)).float(), -1)[0]
            assert not torch.allclose(expected, unadapted, atol=1e-3), task
            torch.testing.assert_close(pending[task][i][0].probs, expected, rtol=0, atol=1e-5, msg=f"{task} {i}")


def test_encoder_pooler_and_head_are_refused_targets(encoder: dict[str, Any]) -> None:
    names = {module.name: module.kind.value for module in encoder["backbone"].fingerprint.modules}
    assert names["classifier"] == "head" and any(n.endswith("pooler.dense") and k == "head" for n, k in names.items())
