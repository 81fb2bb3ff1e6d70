"""The LM head of a half-precision backbone gives float32 logits, as accurate as float32 arithmetic on its half
weights allows (a float64 product is the third thing both are held to); a float32 backbone's head is untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine import lm_head
from server.engine.alibi import reference_attention
from server.engine.backbone import load_backbone
from tests.architectures import CAUSAL_FAMILIES, write_family
from tests.fixtures import TinyBackbone


def exact_logits(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    bias = None if head.bias is None else head.bias.double()
    return torch.nn.functional.linear(hidden.double(), head.weight.double(), bias)


def test_half_precision_head_gives_float32_logits_at_float32_accuracy(tiny_llama: TinyBackbone):
    model = load_backbone(str(tiny_llama.path), "cpu", "bfloat16").model
    head = model.get_output_embeddings()
    hidden = torch.randn(1, 7, head.in_features, generator=torch.Generator().manual_seed(0)).bfloat16() * 4
    logits, stock = head(hidden), torch.nn.Linear.forward(head, hidden)
    exact = exact_logits(head, hidden)
    assert logits.dtype == torch.float32 and logits.shape == (1, 7, head.out_features)
    error, stock_error = float((logits - exact).abs().max()), float((stock.double() - exact).abs().max())
    assert error < 1e-5 * float(exact.abs().max())
    assert stock_error > 100 * error  # the bfloat16 head's own rounding, which this removes


def test_chunked_head_equals_the_exact_product_across_uneven_chunks(monkeypatch: pytest.MonkeyPatch):
    head = torch.nn.Linear(16, 37, bias=True, dtype=torch.bfloat16)
    hidden = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)).bfloat16()
    monkeypatch.setattr(lm_head, "CHUNK_ELEMENTS", 16 * 5)  # slices of 5 vocabulary rows: 37 = 7 x 5 + 2
    chunked = lm_head.chunked_float32_forward(head, hidden)
    assert chunked.shape == (2, 5, 37) and chunked.dtype == torch.float32
    torch.testing.assert_close(chunked.double(), exact_logits(head, hidden), rtol=1e-6, atol=1e-5)


def test_the_cpu_has_no_float32_out_matmul_so_the_head_is_chunked():
    weight = torch.zeros(3, 2, dtype=torch.bfloat16)
    assert not lm_head.has_float32_out_matmul(weight)
    assert lm_head.has_float32_out_matmul(weight.to("meta"))  # where the kernel exists (meta registers it)


def test_float32_backbone_head_is_untouched(tiny_llama: TinyBackbone):
    model = load_backbone(str(tiny_llama.path), "cpu", "float32").model
    head = model.get_output_embeddings()
    assert "forward" not in vars(head)
    assert not lm_head.install(model)


def test_model_transforms_after_the_head_run_on_float32_logits(tmp_path: Path):
    """Gemma-2 caps its final logits at +-30 by tanh after the head: still applied, now in float32."""
    family = next(family for family in CAUSAL_FAMILIES if family.name == "Gemma-2")
    model = load_backbone(str(write_family(family, tmp_path / "gemma2")), "cpu", "bfloat16").model
    input_ids = torch.tensor([[1, 70, 80, 90]])
    with reference_attention(model):  # the backbone's stock attention, outside the engine
        logits = model(input_ids=input_ids).logits
        hidden = model.model(input_ids=input_ids).last_hidden_state
    cap = model.config.final_logit_softcapping
    expected = torch.tanh(exact_logits(model.get_output_embeddings(), hidden) / cap) * cap
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
