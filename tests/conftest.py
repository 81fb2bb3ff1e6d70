"""Session-scoped tiny backbones and adapters; CPU only, no downloads."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures import TinyBackbone, build_tiny_backbone

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> TinyBackbone:
    return build_tiny_backbone("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> TinyBackbone:
    return build_tiny_backbone("gpt2", tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_backbone(request: pytest.FixtureRequest) -> TinyBackbone:
    return request.getfixturevalue(f"tiny_{request.param}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)
