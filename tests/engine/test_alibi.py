"""The ALiBi slopes and biases the engine computes equal each family's own, and an MPT option transformers ignores
is refused at load in one line (server/engine/alibi.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import MptConfig
from transformers.models.bloom.modeling_bloom import build_alibi_tensor as bloom_alibi
from transformers.models.falcon.modeling_falcon import build_alibi_tensor as falcon_alibi
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from server.engine.alibi import AlibiBias, bloom_slopes, mpt_slopes
from server.engine.backbone import SERVED_LIST, load_backbone
from server.engine.default_backbone import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID
from server.engine.errors import UnsupportedBackbone
from tests.fixtures import write_strong_backbone

HEAD_COUNTS = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 40, 48, 64, 71, 96, 112, 128]


@pytest.mark.parametrize("num_heads", HEAD_COUNTS)
def test_bloom_slopes_are_its_own(num_heads: int):
    theirs = bloom_alibi(torch.ones(1, 2, dtype=torch.long), num_heads, torch.float32)[:, 0, 1]  # slope x position 1
    torch.testing.assert_close(bloom_slopes(num_heads), theirs, rtol=0, atol=0)


@pytest.mark.parametrize("num_heads", HEAD_COUNTS)
def test_falcon_bias_is_its_own_in_bfloat16(num_heads: int):
    """Falcon multiplies its slopes by the positions in bfloat16: past 256 positions the products round."""
    num_keys = 300
    theirs = falcon_alibi(torch.ones(1, num_keys, dtype=torch.long), num_heads, torch.float32)[:, 0]  # [heads, L]
    ours = AlibiBias(bloom_slopes(num_heads), rounding=torch.bfloat16)(torch.zeros(1, 1), num_keys)[0, :, 0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("num_heads", HEAD_COUNTS)
def test_mpt_slopes_are_its_own(num_heads: int):
    theirs = -build_mpt_alibi_tensor(num_heads, 2)[:, 0, 0]  # [heads]: slope x (0 - 1)
    torch.testing.assert_close(mpt_slopes(num_heads), theirs, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("attn_config", "reason"),
    [({"qk_ln": True}, "qk_ln"), ({"alibi": False}, "alibi is off"), ({"alibi_bias_max": 16}, "alibi_bias_max")],
    ids=["qk_ln", "alibi off", "alibi_bias_max"],
)
def test_an_mpt_option_transformers_ignores_is_refused_in_one_line(attn_config: dict, reason: str, tmp_path: Path):
    config = MptConfig(
        vocab_size=BYTE_VOCAB_SIZE, d_model=64, n_heads=4, n_layers=2, max_seq_len=64, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, attn_config=attn_config,
    )  # fmt: skip
    path = write_strong_backbone(config, tmp_path / "mpt", seed=0)
    with pytest.raises(UnsupportedBackbone, match=rf"^MptForCausalLM: [^\n]*{reason}[^\n]*; {SERVED_LIST}$"):
        load_backbone(str(path), "cpu", "float32")
