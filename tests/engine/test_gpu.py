"""The same promises on a CUDA device (skipped without one): every served token and log-probability against the
uncached reference the CPU tests use (PEFT's own forward over the whole sequence, on the same device and dtype).

In float32 the tokens must equal the reference's greedy ones. In bfloat16 two correct attentions round differently,
so each served token must be the reference's best within the self-check's tolerance at its position (teacher
forcing: the reference runs over the engine's own tokens) and its log-probability must be the reference's within it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from prompt_store.registry import TaskStore
from server.engine import lm_head
from server.engine.backbone import load_backbone
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.memory_profile import CudaProbe, WorstStep, run_worst_step
from server.engine.selfcheck import tolerance_of
from server.engine.types import Completion
from tests.engine.harness import Harness, token_ids
from tests.engine.test_exactness import TASKS, TEXTS
from tests.engine.test_nlu import TEXTS as NLU_TEXTS
from tests.engine.test_nlu import Driver
from tests.fixtures import TinyBackbone
from tests.nlu_fixtures import NLU_VIRTUAL_TOKENS, nlu_kinds, nlu_reference, write_nlu_adapter, write_nlu_backbone
from tests.reference import greedy_with_logprobs, peft_model
from tests.seq2seq_fixtures import SEQ2SEQ_ADAPTER_KINDS, build_tiny_seq2seq_backbone, load_seq2seq_peft

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NEW_TOKENS = 10


def on_cuda(model: Any, dtype: str) -> Any:
    return model.to(device="cuda", dtype=DTYPES[dtype])


@torch.inference_mode()
def teacher_forced(model: Any, input_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """[T, V] float32: the uncached forward's log-probabilities at each position the engine chose a token."""
    ids = torch.tensor([input_ids + tokens[:-1]], device="cuda")
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -len(tokens) :]
    return logits.float().log_softmax(dim=-1)


@torch.inference_mode()
def seq2seq_teacher_forced(model: Any, input_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """[T, V] float32 for an encoder-decoder: the decoder's start token, then the engine's tokens but the last."""
    decoder_ids = torch.tensor([[model.config.decoder_start_token_id, *tokens[:-1]]], device="cuda")
    encoder_ids = torch.tensor([input_ids], device="cuda")
    logits = model(input_ids=encoder_ids, decoder_input_ids=decoder_ids, use_cache=False).logits[0]
    return logits.float().log_softmax(dim=-1)


def assert_served_as_reference(completion: Completion, logprobs: torch.Tensor, dtype: str) -> None:
    tolerance = tolerance_of(DTYPES[dtype])
    assert completion.tokens, "no token served"
    for step, token in enumerate(completion.tokens):
        chosen, best = float(logprobs[step, token.id]), float(logprobs[step].max())
        assert chosen >= best - tolerance, (
            f"token {step + 1}: {token.id} at {chosen:.4f}; the reference's best is {int(logprobs[step].argmax())} "
            f"at {best:.4f} (tolerance {tolerance:g})"
        )
        assert abs(token.logprob - chosen) <= tolerance, f"token {step + 1}: served {token.logprob}, reference {chosen}"


def assert_causal_rows_match(harness: Harness, completions: list[Completion], dtype: str) -> None:
    for task, completion in zip(TASKS, completions, strict=True):
        model = on_cuda(peft_model(harness.tiny, task), dtype)
        input_ids = list(harness.backbone.tokenizer(TEXTS[task])["input_ids"])
        assert_served_as_reference(completion, teacher_forced(model, input_ids, token_ids(completion)), dtype)
        if dtype == "float32":
            expected, _ = greedy_with_logprobs(model, input_ids, NEW_TOKENS, harness.backbone.eos_token_ids)
            assert token_ids(completion) == expected, f"task {task}"


def assert_seq2seq_rows_match(harness: Harness, seq2seq: TinyBackbone, dtype: str) -> None:
    """A row of each seq2seq adapter kind and a plain row, mixed, each as the reference serves it."""
    tasks = (*SEQ2SEQ_ADAPTER_KINDS, None)
    completions = harness.run(*(harness.request(TEXTS[task], task, max_new_tokens=NEW_TOKENS) for task in tasks))
    for task, completion in zip(tasks, completions, strict=True):
        model = on_cuda(load_seq2seq_peft(seq2seq.path, seq2seq.adapters[task] if task else None), dtype)
        input_ids = list(harness.backbone.tokenizer(TEXTS[task])["input_ids"])
        assert_served_as_reference(completion, seq2seq_teacher_forced(model, input_ids, token_ids(completion)), dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_mixed_batch_of_every_kind_equals_the_reference_on_cuda(tiny_llama: TinyBackbone, tmp_path: Path, dtype):
    harness = Harness(tiny_llama, tmp_path / "store", device="cuda", dtype=dtype)
    completions = harness.run(*(harness.request(TEXTS[task], task, max_new_tokens=NEW_TOKENS) for task in TASKS))
    assert_causal_rows_match(harness, completions, dtype)
    assert harness.is_idle()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_chunked_prefill_equals_the_reference_on_cuda(tiny_llama: TinyBackbone, tmp_path: Path, dtype: str):
    """Steps of five tokens: every prefill is chunked and runs beside the decoding rows."""
    harness = Harness(tiny_llama, tmp_path / "store", device="cuda", dtype=dtype, max_batch_tokens=5, kv_block_size=4)
    completions = harness.run(*(harness.request(TEXTS[task], task, max_new_tokens=NEW_TOKENS) for task in TASKS))
    assert_causal_rows_match(harness, completions, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_preempted_rows_equal_the_reference_on_cuda(tiny_llama: TinyBackbone, tmp_path: Path, dtype: str):
    harness = Harness(tiny_llama, tmp_path / "store", device="cuda", dtype=dtype, kv_cache_tokens=96, kv_block_size=4)
    completions = harness.run(*(harness.request(TEXTS[task], task, max_new_tokens=NEW_TOKENS) for task in TASKS))
    assert harness.engine.num_preemptions > 0
    assert_causal_rows_match(harness, completions, dtype)
    assert harness.is_idle()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_an_encoder_decoder_mixed_batch_equals_the_reference_on_cuda(tmp_path: Path, dtype: str):
    seq2seq = build_tiny_seq2seq_backbone("t5", tmp_path / "t5")
    harness = Harness(seq2seq, tmp_path / "store", device="cuda", dtype=dtype, kv_cache_tokens=96, kv_block_size=4)
    assert_seq2seq_rows_match(harness, seq2seq, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("max_batch_tokens", [4096, 5], ids=["whole", "chunked"])
def test_flex_attention_mixed_batch_equals_the_reference_on_cuda(
    tiny_llama: TinyBackbone, tmp_path: Path, dtype: str, max_batch_tokens: int
):
    """attention_backend=flex, compiled, over the pool in place: the same promise as SDPA's, whole and chunked."""
    harness = Harness(tiny_llama, tmp_path / "store", device="cuda", dtype=dtype, attention_backend="flex",
                      kv_block_size=16, max_batch_tokens=max_batch_tokens)  # fmt: skip
    completions = harness.run(*(harness.request(TEXTS[task], task, max_new_tokens=NEW_TOKENS) for task in TASKS))
    assert_causal_rows_match(harness, completions, dtype)
    assert harness.is_idle()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_flex_attention_encoder_decoder_equals_the_reference_on_cuda(tmp_path: Path, dtype: str):
    """T5's relative bias as a score_mod, cross-attention over the rows' own blocks, compiled."""
    seq2seq = build_tiny_seq2seq_backbone("t5", tmp_path / "t5")
    harness = Harness(seq2seq, tmp_path / "store", device="cuda", dtype=dtype, attention_backend="flex",
                      kv_block_size=16)  # fmt: skip
    assert_seq2seq_rows_match(harness, seq2seq, dtype)


def test_seeded_sampling_same_alone_and_mixed_on_cuda(tiny_llama: TinyBackbone, tmp_path: Path):
    harness = Harness(tiny_llama, tmp_path / "store", device="cuda", dtype="float32")
    sampling = {"do_sample": True, "seed": 99, "max_new_tokens": 10, "top_p": 0.9, "top_k": 20, "temperature": 1.3}
    alone = token_ids(harness.alone("gpu", "prefix", **sampling))
    mixed = harness.run(*(harness.request(TEXTS[t], t) for t in TASKS), harness.request("gpu", "prefix", **sampling))
    assert token_ids(mixed[-1]) == alone


@pytest.mark.parametrize("head", ["seq", "token"])
def test_an_encoder_mixed_batch_equals_the_reference_on_cuda(tmp_path: Path, head: str):
    """BERT with a task of each kind and the bare backbone in shared steps, float32 on CUDA, against PEFT's own
    forward (float32, CPU); a token head's answer has the input tokens only."""
    backbone_dir = write_nlu_backbone("bert", tmp_path / "backbone", head=head)
    adapters = {kind: write_nlu_adapter(backbone_dir, head, kind, tmp_path / kind, NLU_VIRTUAL_TOKENS[kind], seed=s)
                for s, kind in enumerate(nlu_kinds("bert"))}  # fmt: skip
    backbone = load_backbone(str(backbone_dir), "cuda", "float32")
    store = TaskStore(tmp_path / "store", backbone.fingerprint)
    for kind, adapter in adapters.items():
        store.register_dir(kind, adapter)
    driver = Driver(backbone, store, device="cuda")
    answers = {(kind, text): driver.classify_probs(text, kind) for kind in (None, *adapters) for text in NLU_TEXTS}
    driver.run()
    for (kind, text), answer in answers.items():
        expected = nlu_reference(backbone_dir, adapters.get(kind), [text], head)[0]
        got = answer().cpu()
        torch.testing.assert_close(got, expected[-got.shape[0] :], rtol=0, atol=1e-4, msg=f"{kind} on {text!r}")


def test_the_pool_leaves_the_profiled_activation_peak_free(tiny_llama: TinyBackbone):
    """The pool is allocated from what the worst step's peak leaves: that peak is still free afterwards, and the
    same worst step run over the real pool stays within it."""
    backbone = load_backbone(str(tiny_llama.path), "cuda", "bfloat16")
    config = EngineConfig(device="cuda", dtype="bfloat16", kv_cache_memory_fraction=0.5, max_batch_tokens=1024)
    engine = Engine(backbone, config)
    profile, probe = engine.memory_profile, CudaProbe(backbone.device)
    assert profile is not None and profile.activation_bytes > 0
    probe.release_cached()
    assert probe.free_bytes() >= profile.activation_bytes
    worst = WorstStep.of(config, backbone)
    chunks = worst.chunks(backbone, list(range(1, -(-worst.num_slots // config.kv_block_size) + 1)))
    probe.start_peak()
    held = probe.allocated_bytes()
    with torch.inference_mode():
        run_worst_step(engine.runner, chunks, backbone)
    assert probe.peak_bytes() - held <= profile.activation_bytes * 1.05 + (1 << 20)


def test_bfloat16_head_on_cuda_writes_float32_in_one_matmul_as_the_chunked_path(tiny_llama: TinyBackbone):
    model = load_backbone(str(tiny_llama.path), "cuda", "bfloat16").model
    head = model.get_output_embeddings()
    assert lm_head.has_float32_out_matmul(head.weight)
    hidden = torch.randn(1, 9, head.in_features, device="cuda").bfloat16()
    direct = head(hidden)
    assert direct.dtype == torch.float32
    torch.testing.assert_close(direct, lm_head.chunked_float32_forward(head, hidden), rtol=1e-5, atol=1e-4)
