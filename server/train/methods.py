"""The methods as PEFT configurations, with defaults from the papers scaled to small backbones, and the adapter
directory they save (the store's format: adapter_config.json + adapter_model.safetensors).

Prompt tuning, P-tuning and prefix tuning add virtual tokens; LoRA and IA3 change the backbone's own linear layers
(PEFT's default target modules for the model type, where PEFT has them)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from peft.utils import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)

from server.train.loop import replace_dir


@dataclass(frozen=True, slots=True)
class Method:
    name: str  # as `promptserve train --method` spells it
    num_virtual_tokens: int  # 0: the method changes the backbone's layers instead (LoRA, IA3)
    learning_rate: float

    @property
    def is_prompt_learning(self) -> bool:
        return self.num_virtual_tokens > 0


# Lester et al. train prompts at a high rate (0.3 with Adafactor); with AdamW, 3e-2 for the raw prompt. P-tuning's
# and prefix tuning's MLP reparameterisations train at 3e-3. 20 virtual tokens: past about 20 the gains are small.
# LoRA: Hu et al. train GPT-2 M at 2e-4 for 5 epochs; a few hundred steps on a small backbone need about 1e-3.
# IA3: Liu et al. (T-Few) train the scaling vectors at 3e-3.
METHODS = {
    "prompt": Method("prompt", num_virtual_tokens=20, learning_rate=3e-2),
    "p-tuning": Method("p-tuning", num_virtual_tokens=20, learning_rate=3e-3),
    "prefix": Method("prefix", num_virtual_tokens=20, learning_rate=3e-3),
    "lora": Method("lora", num_virtual_tokens=0, learning_rate=1e-3),
    "ia3": Method("ia3", num_virtual_tokens=0, learning_rate=3e-3),
}
PEFT_NAMES = {
    "prompt": "prompt_tuning",
    "p-tuning": "p_tuning",
    "prefix": "prefix_tuning",
    "lora": "lora",
    "ia3": "ia3",
}
IA3_TARGETS = TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer but the output head


@dataclass(frozen=True, slots=True)
class LoraShape:
    """LoRA's settings (`--rank`, `--lora-alpha`, `--lora-dropout`, `--target-modules`): PEFT's default rank 8, with
    alpha 2r (the delta scaled by 2) and a light dropout."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None  # None: PEFT's default for the model type


LORA_DEFAULTS = LoraShape()


def default_targets(method: str, model_type: str) -> tuple[str, ...] | str:
    """PEFT's own default target modules for the model type (what `get_peft_model` would pick); where PEFT has none,
    LoRA takes every linear layer and IA3 needs --target-modules."""
    lora = method == "lora"
    mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING if lora else IA3_TARGETS
    targets = mapping.get(model_type)
    if targets is not None:
        return targets if isinstance(targets, str) else tuple(targets)
    if lora:
        return ALL_LINEAR
    raise ValueError(f"expected --target-modules for --method ia3 on {model_type} (PEFT has no default for it)")


def peft_config(method: str, num_virtual_tokens: int, encoder_hidden_size: int) -> PeftConfig:
    """The prompt-learning methods' configuration. Prompt tuning starts from embeddings of sampled vocabulary (better
    than random, Lester et al.); P-tuning and prefix tuning train through an MLP that is applied and dropped on save
    (Li & Liang, Liu et al.)."""
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
    raise ValueError(f"expected a prompt-learning method of prompt, p-tuning, prefix; found {method!r}")


def lora_config(model_type: str, shape: LoraShape) -> LoraConfig:
    """LoRA on the given target modules, or PEFT's default ones for the model type (every linear layer where PEFT
    has no default). B starts at zero, so the untrained adapter is the backbone (Hu et al.)."""
    targets = peft_targets(shape.target_modules or default_targets("lora", model_type))
    return LoraConfig(
        task_type="CAUSAL_LM", r=shape.rank, lora_alpha=shape.alpha, lora_dropout=shape.dropout, target_modules=targets
    )


def peft_targets(targets: tuple[str, ...] | str) -> list[str] | str:
    """Target modules as PEFT takes them: all-linear only as the string itself (in a list it is a module's name)."""
    return ALL_LINEAR if targets in (ALL_LINEAR, (ALL_LINEAR,)) else list(targets)


def ia3_config(model_type: str, target_modules: tuple[str, ...] | None) -> IA3Config:
    """IA3 on the given target modules, or PEFT's defaults for the model type; a target is scaled at its input
    (a feed-forward module, by PEFT's mapping) or at its output (the others), as PEFT decides for the type."""
    targets = list(target_modules or default_targets("ia3", model_type))
    # PEFT's feed-forward modules among the targets, named as PEFT's mapping names them (GPT-2's `mlp.c_proj`, where
    # a target `c_proj` is also the attention's): PEFT wants feedforward_modules among the target_modules' own names
    mapped = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, [])
    feedforward = [name for name in mapped if name in targets or name.rsplit(".", 1)[-1] in targets]
    return IA3Config(
        task_type="CAUSAL_LM",
        target_modules=targets + [name for name in feedforward if name not in targets],
        feedforward_modules=feedforward,
    )


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
