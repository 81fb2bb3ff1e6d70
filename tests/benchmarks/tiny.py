"""A tiny `cpu` Llama for the benchmarks' own tests: the presets' backbone at a width that runs in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import workload

TINY_LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def write_tiny_backbone(preset: str, directory: Path) -> Path:
    """`workload.write_backbone(preset, directory)` with the `cpu` Llama's shapes shrunk to TINY_LLAMA."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(workload.PRESETS, "cpu", TINY_LLAMA)
        return workload.write_backbone(preset, directory)
