"""Fingerprints of the session's tiny backbones and a fresh store directory per test."""

from __future__ import annotations

import pytest

from prompt_store.types import BackboneFingerprint
from tests.fixtures import TinyBackbone
from tests.prompt_store.helpers import fingerprint_of


@pytest.fixture(scope="session")
def llama_fp(tiny_llama: TinyBackbone) -> BackboneFingerprint:
    return fingerprint_of(tiny_llama.path)


@pytest.fixture(scope="session")
def gpt2_fp(tiny_gpt2: TinyBackbone) -> BackboneFingerprint:
    return fingerprint_of(tiny_gpt2.path)
