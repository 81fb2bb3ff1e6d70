from __future__ import annotations

import pytest

from tests.engine.harness import Harness
from tests.fixtures import TinyBackbone

HARNESS_VARIANTS: dict[str, dict[str, object]] = {
    "whole-prefill": {},
    "chunked": {"max_batch_tokens": 7, "kv_block_size": 4},
    "small-pool": {"kv_cache_tokens": 256, "kv_block_size": 4},
    "prompt-embeds": {"cache_prompt_kv": False, "max_batch_tokens": 3, "kv_block_size": 4},
}


@pytest.fixture(params=list(HARNESS_VARIANTS))
def harness(tiny_backbone: TinyBackbone, tmp_path, request: pytest.FixtureRequest) -> Harness:
    """Every engine test runs four ways: inputs prefilled whole; prefilled in chunks of a 7-token step budget
    beside the running rows' decode tokens; a KV pool of 256 tokens, small enough that rows are preempted and
    recomputed; and prompt tasks fed as input embeddings instead of their shared keys and values, in chunks of a
    3-token budget (so chunks end among a row's virtual tokens)."""
    return Harness(tiny_backbone, tmp_path / "store", **HARNESS_VARIANTS[request.param])  # type: ignore[arg-type]
