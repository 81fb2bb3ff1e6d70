"""The start-up self-check passes on every backbone the engine serves exactly, and stops a broken engine by name."""

from __future__ import annotations

from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from server.engine import model_runner
from server.engine.async_engine import build_engine
from server.engine.batch import Batch
from server.engine.config import EngineConfig
from server.engine.selfcheck import SelfCheckFailed, self_check
from tests.engine.harness import Harness
from tests.fixtures import TinyBackbone


def test_self_check_passes_and_leaves_nothing_behind(harness: Harness):
    assert self_check(harness.engine) < 5
    assert harness.is_idle() and not harness.cache.entries


def ignore_prefixes(self, rows, past_len: int, length: int):
    keys, values = original_prefix_kv(self, rows, past_len, length)
    return [torch.zeros_like(k) for k in keys], [torch.zeros_like(v) for v in values]


original_prefix_kv = model_runner.ModelRunner.prefix_kv


def test_self_check_names_the_prefix_row_when_prefixes_are_lost(
    tiny_backbone: TinyBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    harness = Harness(tiny_backbone, tmp_path / "store")
    monkeypatch.setattr(model_runner.ModelRunner, "prefix_kv", ignore_prefixes)
    with pytest.raises(SelfCheckFailed, match=r"the (prompt|prefix) row") as failed:
        self_check(harness.engine)
    message = str(failed.value)
    assert str(tiny_backbone.path) in message
    assert f"transformers {version('transformers')}" in message and f"torch {version('torch')}" in message
    assert harness.cache.num_refs() == 0 and not harness.cache.entries


def test_self_check_names_the_plain_row_when_decode_positions_stall(
    tiny_llama: TinyBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    harness = Harness(tiny_llama, tmp_path / "store")
    decode_kv = Batch.decode_kv

    def stalled(self: Batch):
        grown, kv = decode_kv(self)
        grown.next_positions = self.next_positions  # every decode token at the same position
        return grown, kv

    monkeypatch.setattr(Batch, "decode_kv", stalled)
    with pytest.raises(SelfCheckFailed, match=r"the plain row's token [2-9]"):
        self_check(harness.engine)


def test_a_failed_self_check_stops_the_start_unless_skipped(
    tiny_llama: TinyBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(model_runner.ModelRunner, "prefix_kv", ignore_prefixes)
    config = EngineConfig(model=str(tiny_llama.path), store_dir=str(tmp_path / "store"), poll_interval_s=0)
    with pytest.raises(SelfCheckFailed, match="PROMPTSERVE_SELF_CHECK=false skips"):
        build_engine(config)
    engine = build_engine(replace(config, self_check=False))
    engine.shutdown()
