"""`python -m benchmarks --preset cpu-lora` end to end on a tiny Llama: it runs, measures and prints every figure.

Only that the figures exist is checked, never their values: benchmarks measure, they do not assert. That the engine
and PEFT did the same work is checked: every greedy output equal to PEFT's (both ways of serving the tasks).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import lora, offline, workload
from tests.benchmarks.tiny import TINY_LLAMA

FIGURES = (
    "lora_mixed_over_uniform",
    "lora_engine_over_peft",
    "lora_engine_over_peft_mixed",
    "lora_engine_over_peft_onednn",
    "kinds_mixed_over_uniform",
    "lora_memory_over_tensor_bytes",
)


@pytest.fixture
def tiny_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(workload.PRESETS, "cpu", TINY_LLAMA)
    small = replace(
        lora.QUICK,
        num_tasks=4,
        ranks=(2, 4),
        input_chars=(4, 12),
        new_tokens=3,
        mixed_requests_per_task=2,
        peft_requests_per_task=2,
        peft_max_batch_size=4,
        num_prompt_tasks=2,
        num_virtual_tokens=3,
        memory_num_tasks=4,
        max_loras=16,
    )
    monkeypatch.setattr(lora, "QUICK", small)


@pytest.mark.slow
@pytest.mark.usefixtures("tiny_preset")
def test_the_lora_preset_measures_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out_json = tmp_path / "lora.json"
    argv = ["--quick", "--preset", "cpu-lora", "--repeats", "1", "--threads", "0"]
    assert offline.main([*argv, "--workdir", str(tmp_path / "work"), "--json", str(out_json)]) == 0

    printed = capsys.readouterr().out
    assert "random Llama 'cpu-lora' preset" in printed
    for name in FIGURES:
        assert name in printed
    assert "adapter_names=" in printed and "set_adapter and one left-padded greedy generate" in printed

    result = json.loads(out_json.read_text())
    assert set(result["goals"]) == set(FIGURES)
    for name in FIGURES:
        assert result[name] > 0
    assert "through oneDNN" in result["details"]["lora_engine_over_peft_onednn"]["definition"]
    assert result["config"]["backbone"]["onednn_linears"] == 0  # auto: a tiny model gains nothing, packs nothing
    for name in ("lora_engine_over_peft", "lora_engine_over_peft_mixed", "lora_engine_over_peft_onednn"):
        assert result["details"][name]["match_rate"] == 1.0, result["details"][name]["match_rate_by_method"]

    # the tasks are what LoRA users bring: PEFT LORA adapters of two ranks on two sets of targets
    configs = [json.loads(path.read_text()) for path in (tmp_path / "work" / "tasks").glob("*/adapter_config.json")]
    assert {c["peft_type"] for c in configs} == {"LORA"} and {c["r"] for c in configs} == {2, 4}


@pytest.mark.usefixtures("tiny_preset")
def test_the_lora_preset_refuses_the_other_presets_sections(capsys: pytest.CaptureFixture[str]):
    assert offline.main(["--quick", "--preset", "cpu-lora", "--threads", "0", "--only", "mixed,static"]) == 2
    assert f"only {','.join(lora.SECTIONS)} run on the LoRA preset" in capsys.readouterr().err
