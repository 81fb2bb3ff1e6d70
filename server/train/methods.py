"""The three methods as PEFT configurations, with defaults from the papers scaled to small backbones, and the
adapter directory they save (the store's format: adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peft import (
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
)

from server.train.loop import replace_dir


@dataclass(frozen=True, slots=True)
class Method:
    name: str  # as `promptserve train --method` spells it
    num_virtual_tokens: int
    learning_rate: float


# Lester et al. train prompts at a high rate (0.3 with Adafactor); with AdamW, 3e-2 for the raw prompt. P-tuning's
# and prefix tuning's MLP reparameterisations train at 3e-3. 20 virtual tokens: past about 20 the gains are small.
METHODS = {
    "prompt": Method("prompt", num_virtual_tokens=20, learning_rate=3e-2),
    "p-tuning": Method("p-tuning", num_virtual_tokens=20, learning_rate=3e-3),
    "prefix": Method("prefix", num_virtual_tokens=20, learning_rate=3e-3),
}
PEFT_NAMES = {"prompt": "prompt_tuning", "p-tuning": "p_tuning", "prefix": "prefix_tuning"}


def peft_config(method: str, num_virtual_tokens: int, encoder_hidden_size: int) -> PeftConfig:
    """Prompt tuning starts from embeddings of sampled vocabulary (better than random, Lester et al.); P-tuning and
    prefix tuning train through an MLP that is applied and dropped on save (Li & Liang, Liu et al.)."""
    if method == "prompt":
        return PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
        )
    if method == "p-tuning":
        return PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, encoder_hidden_size=encoder_hidden_size
        )
    if method == "prefix":
        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=num_virtual_tokens,
            prefix_projection=True,
            encoder_hidden_size=encoder_hidden_size,
        )
    raise ValueError(f"expected a method of {', '.join(METHODS)}; found {method!r}")


def save_adapter(
    model: PeftModel, target: Path, base_model_name: str, extra: Callable[[Path], None] | None = None
) -> Path:
    """PEFT's own layout (plus what `extra` writes beside it), written atomically: a staging directory renamed
    into place, so an interrupted run leaves no half-written adapter."""

    def build(directory: Path) -> None:
        model.save_pretrained(str(directory))
        (directory / "README.md").unlink(missing_ok=True)
        config_path = directory / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_model_name
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if extra is not None:
            extra(directory)

    return replace_dir(build, target)
