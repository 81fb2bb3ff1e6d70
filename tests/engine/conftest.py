from __future__ import annotations

import pytest

from tests.engine.harness import Harness
from tests.fixtures import TinyBackbone


@pytest.fixture
def harness(tiny_backbone: TinyBackbone, tmp_path) -> Harness:
    return Harness(tiny_backbone, tmp_path / "store")
