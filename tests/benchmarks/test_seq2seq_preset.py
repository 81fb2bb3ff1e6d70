"""`python -m benchmarks --preset cpu-t5` end to end on a tiny T5: it runs, measures and prints both ratios.

Only that the figures exist is checked, never their values: benchmarks measure, they do not assert.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import offline, workload

TINY_T5 = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4}


@pytest.fixture
def tiny_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(workload.SEQ2SEQ_PRESETS, "cpu-t5", TINY_T5)
    small = replace(
        offline.QUICK,
        num_tasks=4,
        num_virtual_tokens=3,
        input_chars=(4, 12),
        new_tokens=3,
        mixed_requests_per_task=2,
        peft_num_tasks=4,
        peft_requests_per_task=2,
        peft_max_batch_size=8,
    )
    monkeypatch.setattr(offline, "QUICK", small)


@pytest.mark.slow
@pytest.mark.usefixtures("tiny_preset")
def test_the_seq2seq_preset_measures_mixed_and_peft(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out_json = tmp_path / "t5.json"
    argv = ["--quick", "--preset", "cpu-t5", "--repeats", "1", "--threads", "0"]
    assert offline.main([*argv, "--workdir", str(tmp_path / "work"), "--json", str(out_json)]) == 0

    printed = capsys.readouterr().out
    assert "random T5 v1.1 'cpu-t5' preset" in printed
    for name in ("mixed_over_uniform", "engine_over_peft"):
        assert name in printed
    assert "right-padded greedy generate" in printed  # PEFT's seq2seq baseline, not the causal one

    result = json.loads(out_json.read_text())
    assert result["config"]["backbone"]["is_encoder_decoder"]
    assert set(result["details"]) == {"mixed_over_uniform", "engine_over_peft"}
    for name in result["details"]:
        assert result[name] > 0
    assert 0 <= result["details"]["engine_over_peft"]["match_rate"] <= 1

    # the tasks are what T5 prompt tuning users bring: PEFT SEQ_2_SEQ_LM prompt tuning
    for config_path in (tmp_path / "work" / "tasks").glob("*/adapter_config.json"):
        config = json.loads(config_path.read_text())
        assert (config["task_type"], config["peft_type"]) == ("SEQ_2_SEQ_LM", "PROMPT_TUNING")


@pytest.mark.usefixtures("tiny_preset")
def test_the_seq2seq_preset_refuses_the_llama_only_sections(capsys: pytest.CaptureFixture[str]):
    assert offline.main(["--quick", "--preset", "cpu-t5", "--threads", "0", "--only", "mixed,static"]) == 2
    assert "only mixed,peft" in capsys.readouterr().err
