"""LoRA and IA3 adapters saved by PEFT itself, with weights large enough to move every answer.

PEFT starts LoRA's B at zero and IA3's vectors at one: such an adapter computes exactly what the bare backbone does,
so a test of it could not fail. These fill A and B (and IA3's vectors) with random values of a size that changes the
logits as much as the backbone's own weights do; the tests assert the adapted log-probabilities differ from the bare
backbone's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

LORA_STD = 0.3  # A and B: with scaling 2 the delta is as large as the module's own output
IA3_STD = 0.5  # around 1


def lora_config(method: str, task_type: str = "CAUSAL_LM", **settings: Any) -> LoraConfig | IA3Config:
    if method == "lora":
        return LoraConfig(task_type=task_type, **{"r": 4, "lora_alpha": 8, **settings})
    if method == "ia3":
        return IA3Config(task_type=task_type, **settings)
    raise ValueError(f"unknown method {method!r}")


def randomise(model: PeftModel, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * LORA_STD)
            elif "ia3_l" in name:
                parameter.copy_(1 + torch.randn(parameter.shape, generator=generator) * IA3_STD)


def write_module_adapter(
    backbone_dir: Path, method: str, out_dir: Path, seed: int, auto: Any = None, task_type: str = "CAUSAL_LM",
    **settings: Any,
) -> Path:  # fmt: skip
    """A LoRA or IA3 adapter on the backbone, its weights randomised, saved with PEFT's save_pretrained."""
    base = (auto or AutoModelForCausalLM).from_pretrained(backbone_dir)
    model = get_peft_model(base, lora_config(method, task_type, **settings))
    randomise(model, seed)
    model.save_pretrained(out_dir)
    return out_dir
