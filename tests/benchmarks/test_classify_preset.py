"""`python -m benchmarks --preset cpu-classify` end to end on a tiny encoder: it runs, measures and prints both ratios.

Only that the figures exist is checked, never their values: benchmarks measure, they do not assert. The agreement
with PEFT is checked, because it says the baseline did the same work as the engine (a baseline that lost the
adapter or the prefix would be measuring something else).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import classification, offline, workload

TINY_ENCODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


@pytest.fixture
def tiny_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(workload.CLASSIFY_PRESETS, "cpu-classify", TINY_ENCODER)
    small = replace(classification.QUICK, num_tasks=6, num_virtual_tokens=3, input_chars=(4, 12), requests_per_task=2)
    monkeypatch.setattr(classification, "QUICK", small)


@pytest.mark.slow
@pytest.mark.usefixtures("tiny_preset")
def test_the_classify_preset_measures_mixed_and_peft(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out_json = tmp_path / "classify.json"
    argv = ["--quick", "--preset", "cpu-classify", "--repeats", "1", "--threads", "0"]
    assert offline.main([*argv, "--workdir", str(tmp_path / "work"), "--json", str(out_json)]) == 0

    printed = capsys.readouterr().out
    assert "random BERT-shaped encoder 'cpu-classify' preset" in printed
    for name in ("mixed_over_uniform", "engine_over_peft", "engine_inputs_per_s", "peft_inputs_per_s"):
        assert name in printed
    assert "set_adapter and one right-padded forward" in printed

    result = json.loads(out_json.read_text())
    assert result["config"]["backbone"]["model_type"] == "bert"
    assert set(result["details"]) == {"mixed_over_uniform", "engine_over_peft"}
    for name in result["details"]:
        assert result[name] > 0
    mixed, peft = result["details"]["mixed_over_uniform"], result["details"]["engine_over_peft"]
    assert mixed["mixed_inputs_per_s"] > 0 and mixed["uniform_inputs_per_s"] > 0
    assert peft["engine_inputs_per_s"] > 0 and peft["peft_inputs_per_s"] > 0
    assert peft["agreement"]["same_label_rate"] == 1.0 and peft["agreement"]["max_abs_prob_diff"] < 1e-4
    assert peft["num_tokens"]["peft"] >= peft["num_tokens"]["engine"] > 0  # the same positions, PEFT's padded

    # the tasks are what users bring: PEFT SEQ_CLS adapters of three kinds, each with its own classifier
    configs = [json.loads(path.read_text()) for path in (tmp_path / "work" / "tasks").glob("*/adapter_config.json")]
    assert {c["task_type"] for c in configs} == {"SEQ_CLS"}
    assert {c["peft_type"] for c in configs} == {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"}
    assert all("classifier" in c["modules_to_save"] for c in configs)


@pytest.mark.usefixtures("tiny_preset")
def test_the_classify_preset_refuses_the_generation_sections(capsys: pytest.CaptureFixture[str]):
    assert offline.main(["--quick", "--preset", "cpu-classify", "--threads", "0", "--only", "mixed,static"]) == 2
    assert "only mixed,peft run on an encoder" in capsys.readouterr().err
