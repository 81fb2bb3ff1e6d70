"""FlexAttention over the pool in place (server/engine/paged_flex.py) against the SDPA reference (attention.py): the
same outputs over random pools for every feature the engine's attention has, and the same tokens and
log-probabilities from the engine for every backbone kind and adapter kind, mixed, chunked and preempted. The SDPA
path is itself compared with PEFT's uncached forward by the other engine tests, so agreeing with it is agreeing
with PEFT. Uncompiled here (the CPU); tests/engine/test_gpu.py runs the compiled kernel on CUDA."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from server.engine.alibi import AlibiBias, bloom_slopes
from server.engine.attention import SDPA, Bias, RowBatch, Scoring, TileLimits
from server.engine.config import SettingError
from server.engine.kinds.seq2seq import RelativeBias
from server.engine.paged_flex import FlexBackend, attention_backend
from tests.architectures import CAUSAL_FAMILIES, LONG_TEXT, SLIDING_WINDOW, write_family
from tests.engine.conftest import HARNESS_VARIANTS
from tests.engine.harness import Harness, token_ids
from tests.engine.test_exactness import TASKS, TEXTS
from tests.engine.test_lora import ADAPTERS
from tests.engine.test_nlu import TEXTS as NLU_TEXTS
from tests.engine.test_nlu import Driver, encoder  # noqa: F401  (a fixture)
from tests.fixtures import VIRTUAL_TOKENS, TinyBackbone, write_peft_adapter
from tests.lora_fixtures import write_module_adapter
from tests.seq2seq_fixtures import SEQ2SEQ_ADAPTER_KINDS, SEQ2SEQ_ARCHS, build_tiny_seq2seq_backbone

ATOL = 1e-5  # float32, one layer: the two kernels sum in different orders
ENGINE_ATOL = 5e-5  # float32, log-probabilities after a few layers and ten tokens (T5's differ by 1.2e-5)
BLOCK = 4
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


# ---- the backends side by side, over a random pool


def random_rows(generator: torch.Generator, causal: bool) -> tuple[torch.Tensor, ...]:
    """Five rows over a pool of 40 blocks: two share a 6-token prefix's blocks (its last block half full), one is a
    decode row, the others prefill chunks past their first tokens. Returns RowBatch.tiles' arguments."""
    order = torch.randperm(39, generator=generator) + 1  # block 0 is padding
    prefix = order[:2].tolist()  # 6 tokens: 1.5 blocks
    own = [order[2 + 5 * i : 7 + 5 * i].tolist() for i in range(5)]
    prefix_lengths = [6, 6, 0, 0, 0]
    num_new = torch.tensor([5, 1, 7, 1, 3])
    starts = torch.tensor([2, 9, 0, 4, 11])
    key_lengths = torch.tensor(prefix_lengths) + starts + num_new
    rows = []
    for i, length in enumerate(key_lengths.tolist()):
        prefix_slots = [b * BLOCK + o for b in (prefix if prefix_lengths[i] else []) for o in range(BLOCK)]
        own_slots = [b * BLOCK + o for b in own[i] for o in range(BLOCK)]
        slots = prefix_slots[: prefix_lengths[i]] + own_slots
        rows.append(slots[:length] + [0] * (20 - length))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), num_new.cumsum(0)[:-1]])
    first_positions = torch.tensor(prefix_lengths) + starts
    if not causal:  # cross-attention: every key of the row, from position 0
        first_positions = torch.zeros_like(first_positions)
    return torch.tensor(rows), key_lengths, offsets, num_new, first_positions


def relative_bias(generator: torch.Generator) -> RelativeBias:
    table = torch.nn.Embedding(8, HEADS)
    table.weight.data = torch.randn(8, HEADS, generator=generator)
    return RelativeBias(table, num_buckets=8, max_distance=12)


BIASES: dict[str, Any] = {
    "none": lambda g: None,
    "alibi": lambda g: AlibiBias(bloom_slopes(HEADS)),
    "alibi-falcon": lambda g: AlibiBias(bloom_slopes(HEADS), HEAD_DIM**0.5, torch.bfloat16),
    "t5": relative_bias,
}


@pytest.mark.parametrize("causal", [True, False], ids=["self", "cross"])
@pytest.mark.parametrize("bias", list(BIASES))
@pytest.mark.parametrize("sliding_window", [None, 3])
@pytest.mark.parametrize("softcap", [None, 0.5])
@pytest.mark.parametrize("tiled", [False, True], ids=["one-batch", "tiles"])
def test_flex_equals_sdpa_over_a_random_pool(
    causal: bool, bias: str, sliding_window: int | None, softcap: float | None, tiled: bool
) -> None:
    generator = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(40 * BLOCK, KV_HEADS, HEAD_DIM, generator=generator) for _ in range(2))
    keys[:BLOCK] = values[:BLOCK] = 0  # block 0 stays zeros, as in the pool
    limits = TileLimits(pairs=40, keys=60) if tiled else TileLimits(pairs=2**62, keys=2**62)
    batches = RowBatch.tiles(*random_rows(generator, causal), limits=limits, causal=causal)
    assert len(batches) > 1 or not tiled, "the limits cut the rows into several batches"
    query = torch.randn(1, HEADS, 17, HEAD_DIM, generator=generator)
    chosen: Bias | None = BIASES[bias](generator)
    window = sliding_window if causal else None
    scoring = Scoring(0.3, window, chosen, softcap)
    expected, _ = SDPA.attend(query, KV_HEADS, keys, values, batches, scoring)
    flex = FlexBackend(BLOCK, compiled=False)
    got, _ = flex.attend(query, KV_HEADS, keys, values, batches, scoring)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


@torch.inference_mode()  # the table is changed in place, as the backend built it
def test_a_wrong_block_start_changes_the_output() -> None:
    """The mask reads each slot's position from the step's table: a row whose key sat one block later would see
    other keys (the comparison above can fail)."""
    generator = torch.Generator().manual_seed(1)
    keys, values = (torch.randn(40 * BLOCK, KV_HEADS, HEAD_DIM, generator=generator) for _ in range(2))
    (batch,) = RowBatch.tiles(*random_rows(generator, True), limits=TileLimits(2**62, 2**62))
    query = torch.randn(1, HEADS, 17, HEAD_DIM, generator=generator)
    flex = FlexBackend(BLOCK, compiled=False)
    right, _ = flex.attend(query, KV_HEADS, keys, values, [batch], Scoring())
    table = flex.paged_rows(batch, 40).block_start
    table[batch.gather_slots[0, 0] // BLOCK] += BLOCK
    batch.views = {flex.name: batch.views[flex.name]}  # the masks again, over the shifted table
    wrong, _ = flex.attend(query, KV_HEADS, keys, values, [batch], Scoring())
    assert (right - wrong).abs().max() > 0.01


# ---- the setting


def test_flex_on_cuda_refuses_blocks_narrower_than_a_triton_tile() -> None:
    with pytest.raises(SettingError, match=r"^kv_block_size: expected a multiple of 16 .+; found 8$"):
        attention_backend("flex", torch.device("cuda"), 8)


def test_flex_on_the_cpu_is_uncompiled_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="server.engine.paged_flex"):
        backend = attention_backend("flex", torch.device("cpu"), 8)
    assert isinstance(backend, FlexBackend) and not backend.compiled
    assert "uncompiled" in caplog.text
    assert attention_backend("sdpa", torch.device("cpu"), 8) is SDPA


# ---- the engine: every backbone kind and adapter kind


def served(tiny: TinyBackbone, root: Path, backend: str, **config: Any) -> Harness:
    return Harness(tiny, root / backend, attention_backend=backend, **{"kv_cache_tokens": 2048, **config})


def answers(harness: Harness, texts: dict[str | None, str], new_tokens: int = 8) -> list[tuple[list[int], list[float]]]:
    completions = harness.run(*(harness.request(text, task, max_new_tokens=new_tokens) for task, text in texts.items()))
    assert harness.is_idle()
    return [(token_ids(c), [token.logprob for token in c.tokens]) for c in completions]


def assert_same_answers(flex: list[tuple[list[int], list[float]]], sdpa: list[tuple[list[int], list[float]]]) -> None:
    assert [tokens for tokens, _ in flex] == [tokens for tokens, _ in sdpa]
    for (_, got), (_, expected) in zip(flex, sdpa, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=ENGINE_ATOL)


@pytest.mark.parametrize("variant", list(HARNESS_VARIANTS))
def test_every_adapter_kind_mixed_equals_sdpa(tiny_backbone: TinyBackbone, tmp_path: Path, variant: str) -> None:
    """Prompt, P-tuning, prefix (its held blocks shared by rows) and plain rows in one batch, prefilled whole, in
    chunks beside decoding rows, preempted in a small pool, and with prompts fed as embeddings."""
    config = {"kv_cache_tokens": 2048, **HARNESS_VARIANTS[variant]}
    texts = {task: TEXTS[task] for task in TASKS}
    sdpa, flex = (answers(served(tiny_backbone, tmp_path, backend, **config), texts) for backend in ("sdpa", "flex"))
    assert_same_answers(flex, sdpa)


def test_lora_and_ia3_rows_mixed_equal_sdpa(tiny_llama: TinyBackbone, tmp_path: Path) -> None:
    harnesses = {backend: served(tiny_llama, tmp_path, backend, kv_block_size=4) for backend in ("sdpa", "flex")}
    for seed, (name, settings) in enumerate(ADAPTERS["llama"].items()):
        options = {k: v for k, v in settings.items() if k != "method"}
        adapter = write_module_adapter(tiny_llama.path, settings["method"], tmp_path / name, seed=seed, **options)
        for harness in harnesses.values():
            harness.store.register_dir(name, adapter)
    texts: dict[str | None, str] = {name: f"row {i} of {name}" for i, name in enumerate(ADAPTERS["llama"])}
    assert_same_answers(answers(harnesses["flex"], texts), answers(harnesses["sdpa"], texts))


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHS)
def test_seq2seq_rows_mixed_equal_sdpa(arch: str, tmp_path: Path) -> None:
    """Decoder self-attention (T5's relative bias) and cross-attention over the encoder's keys in the row's own
    blocks, every adapter kind mixed, in a pool small enough to preempt."""
    tiny = build_tiny_seq2seq_backbone(arch, tmp_path / "backbone")
    texts = {task: TEXTS[task] for task in (*SEQ2SEQ_ADAPTER_KINDS, None)}
    config = {"kv_cache_tokens": 96, "kv_block_size": 4}
    sdpa, flex = (answers(served(tiny, tmp_path, backend, **config), texts, 10) for backend in ("sdpa", "flex"))
    assert_same_answers(flex, sdpa)


def test_encoder_rows_mixed_equal_sdpa(encoder: dict[str, Any]) -> None:  # noqa: F811
    backbone, reference = encoder["backbone"], encoder["reference"]
    probs = {}
    for backend in ("sdpa", "flex"):
        driver = Driver(backbone, encoder["store"], attention_backend=backend)
        pending = {(kind, text): driver.classify_probs(text, kind) for kind in reference for text in NLU_TEXTS}
        driver.run()
        probs[backend] = {key: answer() for key, answer in pending.items()}
    for key, expected in probs["sdpa"].items():
        torch.testing.assert_close(probs["flex"][key], expected, rtol=0, atol=ENGINE_ATOL, msg=str(key))


QUIRKS = {"sliding_window", "attn_logit_softcapping"}
QUIRKY = [f for f in CAUSAL_FAMILIES if f.alibi or QUIRKS & set(f.quirk)]


@pytest.mark.parametrize("chosen", QUIRKY, ids=lambda family: family.name)
def test_alibi_windows_and_softcaps_equal_sdpa(chosen: Any, tmp_path: Path) -> None:
    tiny = TinyBackbone(chosen.name, write_family(chosen, tmp_path / "backbone"))
    for seed, kind in enumerate(chosen.kinds):
        tiny.adapters[kind] = write_peft_adapter(
            tiny.path, kind, tmp_path / kind, VIRTUAL_TOKENS[kind], seed=seed, **chosen.peft
        )
    texts = {kind: LONG_TEXT[: 2 * SLIDING_WINDOW + 5 * i] for i, kind in enumerate((*chosen.kinds, None))}
    config = {"max_batch_tokens": 9, "kv_block_size": 4}  # chunked beside decoding rows
    sdpa, flex = (answers(served(tiny, tmp_path, backend, **config), texts) for backend in ("sdpa", "flex"))
    assert_same_answers(flex, sdpa)
