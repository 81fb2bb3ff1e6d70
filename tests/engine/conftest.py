from __future__ import annotations

import pytest

from tests.engine.harness import Harness
from tests.fixtures import TinyBackbone


@pytest.fixture(params=[256, 0], ids=["one-pass", "split-prefill"])
def harness(tiny_backbone: TinyBackbone, tmp_path, request: pytest.FixtureRequest) -> Harness:
    """Every engine test runs twice: admitted requests prefilled together, and split into passes by length."""
    return Harness(tiny_backbone, tmp_path / "store", prefill_split_tokens=request.param)
