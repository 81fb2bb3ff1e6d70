"""The start-up self-check passes on every backbone the engine serves exactly, and stops a broken engine by name."""

from __future__ import annotations

import logging
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from server.engine import model_runner
from server.engine.adapters import AdapterHooks
from server.engine.async_engine import build_engine
from server.engine.config import EngineConfig
from server.engine.selfcheck import SelfCheckFailed, self_check, tolerance_of
from server.engine.task_cache import TaskCache
from tests.engine.harness import Harness
from tests.engine.test_lora_isolation import projecting_other_inputs
from tests.fixtures import TinyBackbone


def test_self_check_passes_and_leaves_nothing_behind(harness: Harness):
    assert self_check(harness.engine) > 0
    assert harness.is_idle() and not harness.engine.memory.tasks and not harness.engine.tasks.embeddings


@pytest.mark.parametrize("settings", [{"max_waiting": 1}, {"max_waiting": 1, "max_batch_size": 1}])
def test_self_check_passes_with_a_waiting_queue_smaller_than_its_rows(
    tiny_llama: TinyBackbone, tmp_path: Path, settings: dict[str, int]
):
    """Its rows are the engine's own: a max_waiting meant for clients (the server refused to start with 4, blaming
    the installed versions) does not refuse them, and they still run within max_batch_size."""
    harness = Harness(tiny_llama, tmp_path / "store", **settings)
    assert self_check(harness.engine) > 0
    assert harness.is_idle()


def keys_and_values_never_written(self, blocks, artifact):
    """A task's shared keys and values are lost: its blocks read as zeros."""
    blocks.is_filled = True


def test_self_check_names_the_prefix_row_when_task_keys_and_values_are_lost(
    tiny_backbone: TinyBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    harness = Harness(tiny_backbone, tmp_path / "store")
    monkeypatch.setattr(TaskCache, "fill", keys_and_values_never_written)
    with pytest.raises(SelfCheckFailed, match=r"the (prompt|prefix) row") as failed:
        self_check(harness.engine)
    message = str(failed.value)
    assert str(tiny_backbone.path) in message
    assert f"transformers {version('transformers')}" in message and f"torch {version('torch')}" in message
    assert harness.is_idle() and not harness.engine.memory.tasks


def test_self_check_names_the_plain_row_when_positions_stall(
    tiny_llama: TinyBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    harness = Harness(tiny_llama, tmp_path / "store")
    layout_of = model_runner.StreamLayout.of

    def stalled(chunks, block_size, *args):
        layout = layout_of(chunks, block_size, *args)
        return replace(layout, positions=layout.positions.clamp(max=8))

    monkeypatch.setattr(model_runner.StreamLayout, "of", stalled)
    with pytest.raises(SelfCheckFailed, match=r"token \d of the plain row \(\d+ input tokens\)"):
        self_check(harness.engine)


def test_a_failed_self_check_stops_the_start_unless_skipped(
    tiny_llama: TinyBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(TaskCache, "fill", keys_and_values_never_written)
    config = EngineConfig(model=str(tiny_llama.path), store_dir=str(tmp_path / "store"), poll_interval_s=0)
    with pytest.raises(SelfCheckFailed, match="PROMPTSERVE_SELF_CHECK=false skips"):
        build_engine(config)
    engine = build_engine(replace(config, self_check=False))
    engine.shutdown()


def test_half_precision_tolerance_is_32_ulps_to_the_measured_depth_and_grows_as_its_square_root_beyond():
    assert tolerance_of(torch.float32, 80) == 1e-3
    assert tolerance_of(torch.bfloat16, 2) == tolerance_of(torch.bfloat16, 32) == 0.25
    assert tolerance_of(torch.float16, 32) == 32 * 2**-10
    assert tolerance_of(torch.bfloat16, 128) == pytest.approx(0.5)


@pytest.mark.parametrize(("broken", "row"), [("add_delta", "lora"), ("scale_input", "ia3")])
def test_self_check_names_the_adapter_row_when_its_hooks_do_nothing(
    tiny_llama: TinyBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str, row: str
):
    """A backbone whose modules the engine's LoRA / IA3 hooks never reach (here: the hooks compute nothing)."""
    harness = Harness(tiny_llama, tmp_path / "store")
    monkeypatch.setattr(AdapterHooks, broken, lambda self, name, *args: None)
    with pytest.raises(SelfCheckFailed, match=rf"the {row} row \(\d+ input tokens\)"):
        self_check(harness.engine)
    assert harness.is_idle() and not harness.engine.tasks.adapters.resident


def test_self_check_finds_a_module_the_engine_cannot_adapt_and_leaves_it_out(
    tiny_llama: TinyBackbone, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A module the backbone also runs on vectors that are not the tokens: the check passes without it, names it,
    and tasks targeting it are refused from then on."""
    harness = Harness(tiny_llama, tmp_path / "store")
    name = "model.layers.1.mlp.up_proj"
    projecting_other_inputs(harness.backbone, name)
    with caplog.at_level(logging.WARNING):
        assert self_check(harness.engine) > 0
    assert list(harness.engine.tasks.adapters.hooks.unservable) == [name] and name in caplog.text
    assert harness.is_idle() and not harness.engine.tasks.adapters.resident
