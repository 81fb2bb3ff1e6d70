from __future__ import annotations

import pytest

from tests.engine.harness import Harness
from tests.fixtures import TinyBackbone

HARNESS_VARIANTS = {
    "one-pass": {"prefill_split_tokens": 256},
    "split-prefill": {"prefill_split_tokens": 0},
    "prompt-embeds": {"cache_prompt_kv": False},
}


@pytest.fixture(params=list(HARNESS_VARIANTS))
def harness(tiny_backbone: TinyBackbone, tmp_path, request: pytest.FixtureRequest) -> Harness:
    """Every engine test runs three ways: admitted requests prefilled together; split into passes by length; and
    prompt rows fed as input embeddings instead of the cached keys and values of their virtual tokens."""
    return Harness(tiny_backbone, tmp_path / "store", **HARNESS_VARIANTS[request.param])  # type: ignore[arg-type]
