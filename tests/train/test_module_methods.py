"""`promptserve train --method lora | ia3`: PEFT's own adapter directory, on PEFT's default target modules for the
model type unless told otherwise, that PEFT loads and that moves the backbone's output; the store takes it, flags
that do not fit the method are refused before training, and --register serves it as PEFT computes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from peft.utils import (
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from prompt_store.adapter import StoreLimits, parse_adapter
from promptserve_client import Client
from server.engine.backbone import fingerprint_of
from tests.fixtures import TinyBackbone
from tests.reference import peft_greedy
from tests.train.test_cli import TOKEN, no_training, refusal, served, train

DEFAULT_TARGETS = {"lora": TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
                   "ia3": TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING}  # fmt: skip


def load(tiny: TinyBackbone, adapter: Path | None) -> torch.nn.Module:
    base = AutoModelForCausalLM.from_pretrained(tiny.path)
    return (base if adapter is None else PeftModel.from_pretrained(base, adapter)).eval()


@torch.inference_mode()
def logits(model: torch.nn.Module, tiny: TinyBackbone, text: str) -> torch.Tensor:
    ids = AutoTokenizer.from_pretrained(tiny.path)(text, return_tensors="pt")["input_ids"]
    return model(input_ids=ids).logits  # type: ignore[no-any-return]


@pytest.mark.parametrize(("method", "learning_rate"), [("lora", "3e-3"), ("ia3", "3e-2")])
def test_a_short_run_learns_and_saves_what_peft_loads(
    tiny_backbone: TinyBackbone, data: Path, tmp_path: Path, method: str, learning_rate: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    output = tmp_path / "task"
    assert train(tiny_backbone, data, output, "--method", method, "--learning-rate", learning_rate) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["loss_last"] < metrics["loss_first"] * 0.9, metrics["loss_curve"]
    assert metrics["method_peft"] == method and metrics["num_virtual_tokens"] == 0

    config = json.loads((output / "adapter_config.json").read_text())
    model_type = AutoModelForCausalLM.from_pretrained(tiny_backbone.path).config.model_type
    assert config["peft_type"] == method.upper() and config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == sorted(DEFAULT_TARGETS[method][model_type])  # PEFT's own default
    if method == "lora":
        assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)
        assert config["fan_in_fan_out"] == (model_type == "gpt2")  # GPT-2's Conv1D stores its weight [in, out]
    model = load(tiny_backbone, output)
    saved = load_file(output / "adapter_model.safetensors")
    assert saved.keys() == get_peft_model_state_dict(model).keys()  # exactly PEFT's tensors, nothing missing
    base = load(tiny_backbone, None)
    assert not torch.allclose(logits(model, tiny_backbone, "cat dog"), logits(base, tiny_backbone, "cat dog"))

    content = parse_adapter(
        (output / "adapter_config.json").read_bytes(), (output / "adapter_model.safetensors").read_bytes(),
        fingerprint_of(AutoModelForCausalLM.from_pretrained(tiny_backbone.path)), StoreLimits(),
    )  # fmt: skip
    assert content.method == method and content.num_virtual_tokens == 0
    out = capsys.readouterr().out
    assert f"trained {method} ({'LoRA rank 8, alpha 16' if method == 'lora' else 'IA3'} on " in out


def test_lora_flags_shape_the_adapter(tiny_llama: TinyBackbone, data: Path, tmp_path: Path) -> None:
    output = tmp_path / "task"
    flags = ["--rank", "4", "--lora-alpha", "32", "--lora-dropout", "0", "--target-modules", "q_proj,down_proj"]
    assert train(tiny_llama, data, output, "--method", "lora", "--steps", "3", *flags) == 0
    config = json.loads((output / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 32, 0.0)
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj"]
    shapes = {name: list(t.shape) for name, t in load_file(output / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] == [4, 96]  # [r, intermediate]
    assert shapes["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"] == [48, 4]  # [hidden, r]


LINEAR = {"llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
          "gpt2": ["c_attn", "c_fc", "c_proj"]}  # fmt: skip
FEEDFORWARD = {"llama": ["down_proj"], "gpt2": ["mlp.c_proj"]}  # PEFT's, for IA3: scaled at their input


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_all_linear_targets_every_linear_layer_but_the_output(
    tiny_backbone: TinyBackbone, data: Path, tmp_path: Path, method: str
) -> None:
    output = tmp_path / "task"
    assert train(tiny_backbone, data, output, "--method", method, "--steps", "2", "--target-modules", "all-linear") == 0
    config = json.loads((output / "adapter_config.json").read_text())
    arch = AutoModelForCausalLM.from_pretrained(tiny_backbone.path).config.model_type
    assert sorted({name.rsplit(".", 1)[-1] for name in config["target_modules"]}) == LINEAR[arch]
    if method == "ia3":
        assert config["feedforward_modules"] == FEEDFORWARD[arch]
        scaled = {"gpt2": "transformer.h.0.mlp.c_proj", "llama": "model.layers.0.mlp.down_proj"}[arch]
        scales = load_file(output / "adapter_model.safetensors")
        assert scales[f"base_model.model.{scaled}.ia3_l"].shape[0] == 1  # [1, in]: the module's input scaled


def test_flags_that_do_not_fit_the_method_are_refused_before_training(
    tiny_llama: TinyBackbone, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    no_training(monkeypatch)
    out = tmp_path / "task"
    assert "expected --rank with --method lora; found --method prompt" in refusal(
        capsys, tiny_llama, data, out, "--rank", "4"
    )
    assert "expected --target-modules with --method lora or ia3; found --method prompt" in refusal(
        capsys, tiny_llama, data, out, "--target-modules", "q_proj"
    )
    lora = ["--method", "lora"]  # after refusal's own --method prompt: argparse keeps the last
    assert "expected --num-virtual-tokens with --method prompt or p-tuning or prefix; found --method lora" in refusal(
        capsys, tiny_llama, data, out, *lora, "--num-virtual-tokens", "4"
    )
    for targets in ("no_such_proj", "q_proj,no_such_proj"):  # PEFT itself trains the second on q_proj alone
        assert (
            "expected --target-modules naming modules of the llama backbone (its linear layers: q_proj, "
            in (error := refusal(capsys, tiny_llama, data, out, *lora, "--target-modules", targets))
            and "found 'no_such_proj', which names none" in error
        ), error
    assert "lm_head (Linear)" in (error := refusal(capsys, tiny_llama, data, out, *lora, "--target-modules", "lm_head"))
    assert "output layer" in error, error  # as the server refuses it, not by the embedding tensor PEFT saves beside
    assert "expected an adapter the server takes; this one would be refused" in refusal(
        capsys, tiny_llama, data, out, *lora, "--rank", "65"
    )  # above the store's max_lora_rank (64)
    assert not out.exists()


def test_register_refuses_a_rank_above_the_servers_before_training(
    tiny_llama: TinyBackbone, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    no_training(monkeypatch)
    with served(tiny_llama, tmp_path, max_lora_rank=4) as url:
        register = ["--register", url, "--token", TOKEN, "--method", "lora"]
        error = refusal(capsys, tiny_llama, data, tmp_path / "task", *register)
    assert "this one would be refused" in error and "max_lora_rank 4" in error and "found rank 8" in error


def test_register_serves_the_lora_task_as_peft_computes_it(
    tiny_llama: TinyBackbone, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "lora-task"
    with served(tiny_llama, tmp_path) as url:
        register = ["--register", url, "--token", TOKEN]
        assert train(tiny_llama, data, output, "--method", "lora", "--learning-rate", "3e-3", *register) == 0
        out = capsys.readouterr().out
        record = json.loads(out[out.index("\n{") :])
        assert record["task_id"] == "lora-task" and record["method"] == "lora" and record["rank"] == 8
        with Client(url) as client:
            answer = client.generate("cat dog", task_id="lora-task", max_new_tokens=6, details=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama.path)
    expected = peft_greedy(load(tiny_llama, output), tokenizer("cat dog")["input_ids"], 6)
    assert expected != peft_greedy(load(tiny_llama, None), tokenizer("cat dog")["input_ids"], 6)  # it learned
    assert answer.details is not None and [token.id for token in answer.details.tokens or []] == expected
