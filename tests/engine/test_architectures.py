"""The architecture matrix (tests/architectures.py): each causal family served with every adapter kind, mixed in one
batch with a plain row, inputs longer than any sliding window, each row's tokens and log-probabilities equal to
PEFT's own forward without a cache; and each test backbone strong enough that a wrong position, norm, bias or
quirk would show."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, BartConfig, PreTrainedTokenizerFast

from server.engine.alibi import AlibiBias
from server.engine.backbone import SERVED_LIST, load_backbone
from server.engine.default_backbone import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID
from server.engine.errors import InvalidTask, UnsupportedBackbone
from server.engine.selfcheck import SelfCheckFailed, self_check
from tests.architectures import (
    CAUSAL_FAMILIES,
    LONG_TEXT,
    MODELS_PAGE,
    REFUSED,
    SLIDING_WINDOW,
    Family,
    Listed,
    listed_table,
    models_table,
    write_family,
)
from tests.engine.harness import Harness
from tests.fixtures import VIRTUAL_TOKENS, TinyBackbone, write_peft_adapter, write_strong_backbone
from tests.lora_fixtures import write_module_adapter
from tests.reference import greedy_with_logprobs
from tests.seq2seq_fixtures import greedy_seq2seq_logprobs

NEW_TOKENS = 8
LOGPROB_TOLERANCE = 1e-4  # float32
MIN_MOVE = 0.1  # what a wrong position must move some logit by, at least


def texts_of(family: Family) -> dict[str | None, str]:
    """Each row's input: all longer than the sliding window (and its prefix), of different lengths."""
    return {kind: LONG_TEXT[: 2 * SLIDING_WINDOW + 5 * i] for i, kind in enumerate((*family.kinds, None))}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Family], TinyBackbone]:
    """Each family's backbone and adapters, written once for the module."""

    cache: dict[str, TinyBackbone] = {}

    def build(chosen: Family) -> TinyBackbone:
        if (reason := chosen.skip_reason()) is not None:
            pytest.skip(reason)
        if chosen.name in cache:
            return cache[chosen.name]
        root = tmp_path_factory.mktemp(f"arch-{chosen.config_class}")
        tiny = TinyBackbone(chosen.name, write_family(chosen, root / "backbone"))
        for seed, kind in enumerate(chosen.kinds):
            tiny.adapters[kind] = write_peft_adapter(
                tiny.path, kind, root / kind, VIRTUAL_TOKENS[kind], seed=seed, **chosen.peft
            )
        cache[chosen.name] = tiny
        return tiny

    return build


@pytest.fixture(params=CAUSAL_FAMILIES, ids=lambda family: family.name)
def family(request: pytest.FixtureRequest, built: Callable[[Family], TinyBackbone]) -> tuple[Family, TinyBackbone]:
    return request.param, built(request.param)


@pytest.fixture(params=["torch", "onednn"])
def linears(request: pytest.FixtureRequest) -> str:
    """The shared pass's linear layers on torch's matmul, or all through oneDNN (server/engine/cpu_linears.py)."""
    return str(request.param)


def harness_on(tiny: TinyBackbone, store: Path, linears: str) -> Harness:
    harness = Harness(tiny, store)
    if linears == "onednn" and not harness.through_onednn():
        pytest.skip("no nn.Linear in its shared pass (GPT-2's Conv1D layers)")
    return harness


def test_every_kind_mixed_in_one_batch_equals_peft_forward(
    family: tuple[Family, TinyBackbone], linears: str, tmp_path: Path
):
    chosen, tiny = family
    harness = harness_on(tiny, tmp_path / "store", linears)
    texts = texts_of(chosen)
    completions = harness.run(*(harness.request(text, kind, max_new_tokens=NEW_TOKENS) for kind, text in texts.items()))
    for (kind, text), completion in zip(texts.items(), completions, strict=True):
        base = AutoModelForCausalLM.from_pretrained(tiny.path).eval()
        model = base if kind is None else PeftModel.from_pretrained(base, tiny.adapters[kind]).eval()
        input_ids = list(harness.backbone.tokenizer(text)["input_ids"])
        tokens, logprobs = greedy_with_logprobs(model, input_ids, NEW_TOKENS, harness.backbone.eos_token_ids)
        assert [token.id for token in completion.tokens] == tokens, f"{chosen.name}, {kind}"
        served = torch.tensor([token.logprob for token in completion.tokens])
        torch.testing.assert_close(served, torch.tensor(logprobs), rtol=0, atol=LOGPROB_TOLERANCE)
    assert harness.is_idle()


def test_the_self_check_passes_on_every_family(family: tuple[Family, TinyBackbone], tmp_path: Path):
    """Its LoRA and IA3 rows too, on every linear layer of the shared pass: no family's layer is missed by the
    engine's hooks or run on anything but the tokens."""
    harness = Harness(family[1], tmp_path / "store")
    assert self_check(harness.engine) > 0
    assert harness.engine.tasks.adapters.hooks.unservable == {}
    assert harness.is_idle() and not harness.engine.tasks.adapters.resident


@torch.inference_mode()
@pytest.mark.parametrize("chosen", [f for f in CAUSAL_FAMILIES if not f.alibi], ids=lambda family: family.name)
def test_a_wrong_position_moves_the_logits(built: Callable[[Family], TinyBackbone], chosen: Family):
    """The last token one position too far: a backbone this test suite serves must notice (ALiBi families take no
    position ids: see the next test)."""
    tiny = built(chosen)
    model = AutoModelForCausalLM.from_pretrained(tiny.path).eval()
    input_ids = torch.tensor([list(range(65, 65 + 2 * SLIDING_WINDOW))])
    positions = torch.arange(input_ids.shape[1])[None]
    shifted = positions.clone()
    shifted[0, -1] += 1
    right = model(input_ids=input_ids, position_ids=positions).logits[0, -1]
    wrong = model(input_ids=input_ids, position_ids=shifted).logits[0, -1]
    assert (right - wrong).abs().max() >= MIN_MOVE


@pytest.mark.parametrize("chosen", [f for f in CAUSAL_FAMILIES if f.alibi], ids=lambda family: family.name)
def test_a_wrong_alibi_position_fails_the_self_check(
    built: Callable[[Family], TinyBackbone], chosen: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The start-up self-check passes on an ALiBi family, and fails when each row's first key is biased as if it sat
    one position later: the backbone is strong enough that ALiBi's distances show."""
    harness = Harness(built(chosen), tmp_path / "store")
    assert self_check(harness.engine) > 0
    biased = AlibiBias.__call__

    def first_key_one_off(self: AlibiBias, query_positions: torch.Tensor, num_keys: int) -> torch.Tensor:
        bias = biased(self, query_positions, num_keys).clone()  # [1, heads, 1, L]
        bias[..., 0] = biased(self, query_positions, 2)[..., 1]
        return bias

    monkeypatch.setattr(AlibiBias, "__call__", first_key_one_off)
    with pytest.raises(SelfCheckFailed, match=r"token \d of the (plain|prompt|prefix) row .* the backbone's uncached"):
        self_check(harness.engine)


@pytest.mark.parametrize("chosen", [f for f in CAUSAL_FAMILIES if "prefix" not in f.kinds], ids=lambda f: f.name)
def test_a_prefix_task_is_refused_at_registration_where_peft_cannot_apply_one(
    built: Callable[[Family], TinyBackbone], chosen: Family, tmp_path: Path
):
    tiny = built(chosen)
    prefix = write_peft_adapter(tiny.path, "prefix", tmp_path / "prefix", VIRTUAL_TOKENS["prefix"], seed=0)
    harness = Harness(tiny, tmp_path / "store")
    assert not harness.backbone.fingerprint.takes_prefix
    with pytest.raises(InvalidTask, match="peft_type must be PROMPT_TUNING or P_TUNING on this"):
        harness.store.register_dir("prefix", prefix)


QUIRKS_GREEDY_TOKENS_HARDLY_SEE = {"sliding_window": 4096, "attn_logit_softcapping": None}  # quirk: its "off" value


@torch.inference_mode()
@pytest.mark.parametrize(
    ("chosen", "quirk"),
    [(f, quirk) for f in CAUSAL_FAMILIES for quirk in QUIRKS_GREEDY_TOKENS_HARDLY_SEE if quirk in f.quirk],
    ids=lambda value: value.name if isinstance(value, Family) else value,
)
def test_the_familys_quirk_moves_the_logits(built: Callable[[Family], TinyBackbone], chosen: Family, quirk: str):
    """A sliding window or a softcap the engine ignored would show in the log-probabilities the matrix compares."""
    tiny = built(chosen)
    input_ids = torch.tensor([list(LONG_TEXT.encode())])
    with_quirk = AutoModelForCausalLM.from_pretrained(tiny.path).eval()
    without = AutoModelForCausalLM.from_pretrained(tiny.path, **{quirk: QUIRKS_GREEDY_TOKENS_HARDLY_SEE[quirk]}).eval()
    moved = with_quirk(input_ids=input_ids).logits - without(input_ids=input_ids).logits
    assert moved.abs().max() >= MIN_MOVE


def test_the_models_pages_table_is_the_matrix():
    assert listed_table(MODELS_PAGE.read_text()) == models_table(), "regenerate it: python -m tests.architectures"


def test_the_models_pages_table_lists_lora_and_ia3_on_every_family_served_with_them():
    """test_lora_and_ia3_on_every_linear_layer_mixed_equal_peft_forward runs on every causal family."""
    rows = {line.split(" | ")[1]: line for line in listed_table(MODELS_PAGE.read_text()).splitlines()[2:]}
    for family in CAUSAL_FAMILIES:
        assert "LoRA, IA3" in rows[f"`{family.config_class}`"], family.name
    assert all("LoRA, IA3" in rows[f"`{name}`"] for name in ("T5Config", "BartConfig", "BertConfig"))


@pytest.mark.parametrize("listed", [r for r in REFUSED if r.config_class != "AlbertConfig"], ids=lambda r: r.name)
def test_a_family_the_models_page_lists_as_refused_is_refused_at_load(listed: Listed, tmp_path: Path):
    """ALBERT's refusal is tested with the encoders (tests/engine/test_other_encoders.py)."""
    config = getattr(transformers, listed.config_class)(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, num_attention_heads=4, num_hidden_layers=2, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, intermediate_size=128,
    )  # fmt: skip
    path = write_strong_backbone(config, tmp_path / listed.name, seed=0)
    with pytest.raises(UnsupportedBackbone, match=rf"^\w+ForCausalLM: .+; {SERVED_LIST}$"):
        load_backbone(str(path), "cpu", "float32")


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE vocabulary with its three special tokens first (pad 0, </s> 1, <s> 2), no merges, nothing
    added around an input: "hi" is [74, 75]."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=byte_level_order)
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{char: i + 3 for i, char in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


def byte_level_order(char: str) -> int:
    """GPT-2's byte order: printable bytes first, in order, then the others (mapped past 255)."""
    return ord(char) if ord(char) < 256 else 256 + ord(char)


def test_the_reported_bart_answers_as_its_own_forward(tmp_path: Path):
    """The BART of issue 21 (d_model 64, init_std 0.3, pad = decoder start = 0): greedy, 12 tokens, alone."""
    config = BartConfig(
        vocab_size=259, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, init_std=0.3, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(1)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(tmp_path / "bart")
    tokenizer = byte_level_tokenizer()
    tokenizer.save_pretrained(tmp_path / "bart")
    assert tokenizer("hi")["input_ids"] == [74, 75]
    harness = Harness(TinyBackbone("bart", tmp_path / "bart"), tmp_path / "store")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "bart").eval()
    for text in ("hi", "translate this", "a fifty-character input, to be read from the start"):
        tokens, logprobs = greedy_seq2seq_logprobs(model, tokenizer(text)["input_ids"], 12, eos_id=1)
        completion = harness.alone(text, None, max_new_tokens=12)
        assert [token.id for token in completion.tokens] == tokens, text
        served = torch.tensor([token.logprob for token in completion.tokens])
        torch.testing.assert_close(served, torch.tensor(logprobs), rtol=0, atol=LOGPROB_TOLERANCE)


@torch.inference_mode()
def test_mpts_clip_qkv_moves_the_logits(built: Callable[[Family], TinyBackbone]):
    """MPT's clip_qkv bites on the matrix's MPT: an engine that skipped the clamp would show."""
    tiny = built(next(f for f in CAUSAL_FAMILIES if f.config_class == "MptConfig"))
    input_ids = torch.tensor([list(LONG_TEXT.encode())])
    clipped = AutoModelForCausalLM.from_pretrained(tiny.path).eval()
    unclipped = AutoModelForCausalLM.from_pretrained(tiny.path).eval()
    for block in unclipped.base_model.blocks:
        block.attn.clip_qkv = None
    moved = clipped(input_ids=input_ids).logits - unclipped(input_ids=input_ids).logits
    assert moved.abs().max() >= MIN_MOVE


def test_lora_and_ia3_on_every_linear_layer_mixed_equal_peft_forward(
    family: tuple[Family, TinyBackbone], linears: str, tmp_path: Path
):
    """A LoRA task on every linear layer but the output (PEFT's "all-linear"; a mixture's attention, its experts
    being parameters PEFT adapts otherwise), an IA3 task on the same layers, a prompt-learning row and a plain row in
    one batch: each equals PEFT's own forward for its adapter alone."""
    chosen, tiny = family
    harness = harness_on(tiny, tmp_path / "store", linears)
    targets: str | list[str] = "all-linear"
    if "num_local_experts" in chosen.quirk:  # PEFT adapts the fused experts as parameters: not served
        experts = write_module_adapter(tiny.path, "lora", tmp_path / "experts", seed=10, target_modules="all-linear")
        with pytest.raises(InvalidTask, match="target_parameters must be unset"):
            harness.store.register_dir("experts", experts)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    module_adapters = {
        "lora": write_module_adapter(tiny.path, "lora", tmp_path / "lora", seed=11, target_modules=targets),
        "ia3": write_module_adapter(
            tiny.path, "ia3", tmp_path / "ia3", seed=12, target_modules=targets, feedforward_modules=[]
        ),
    }
    for name, directory in module_adapters.items():
        harness.store.register_dir(name, directory)
    rows = {"lora": LONG_TEXT[:20], "ia3": LONG_TEXT[:17], chosen.kinds[0]: LONG_TEXT[:15], None: LONG_TEXT[:12]}
    completions = harness.run(*(harness.request(text, task, max_new_tokens=NEW_TOKENS) for task, text in rows.items()))
    for (task, text), completion in zip(rows.items(), completions, strict=True):
        base = AutoModelForCausalLM.from_pretrained(tiny.path).eval()
        directory = module_adapters.get(task) or tiny.adapters.get(task)  # type: ignore[arg-type]
        model = base if directory is None else PeftModel.from_pretrained(base, directory).eval()
        input_ids = list(harness.backbone.tokenizer(text)["input_ids"])
        tokens, logprobs = greedy_with_logprobs(model, input_ids, NEW_TOKENS, harness.backbone.eos_token_ids)
        if task in module_adapters:  # the adapter matters: its first log-probability is not the bare backbone's
            bare = AutoModelForCausalLM.from_pretrained(tiny.path).eval()
            _, bare_logprobs = greedy_with_logprobs(bare, input_ids, 1, harness.backbone.eos_token_ids)
            assert abs(bare_logprobs[0] - logprobs[0]) > 1e-3, f"{chosen.name}: the {task} task changes nothing"
        assert [token.id for token in completion.tokens] == tokens, f"{chosen.name}, {task}"
        served = torch.tensor([token.logprob for token in completion.tokens])
        torch.testing.assert_close(served, torch.tensor(logprobs), rtol=0, atol=LOGPROB_TOLERANCE)
    assert harness.is_idle()
