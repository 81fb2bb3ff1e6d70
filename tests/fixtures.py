"""Tiny backbones built from configs (random weights) and PEFT adapters of every prompt-learning kind.

Everything is saved to disk and loaded back through `from_pretrained`, exactly as a real model would be.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import (
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from server.engine.default_backbone import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, byte_tokenizer, seeded_model

# A chat template as chat models ship one (in tokenizer_config.json), refusing roles it does not know.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unexpected role ' + m['role']) }}{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)
ADAPTER_KINDS = ("prompt_tuning", "p_tuning_mlp", "p_tuning_lstm", "prefix", "prefix_projection")


def tiny_llama_config() -> LlamaConfig:
    """Grouped-query attention: 6 query heads share 2 KV heads (head_dim 8)."""
    return LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        initializer_range=0.2,  # the default 0.02 makes attention near-uniform: positions would hardly matter
    )


def tiny_gpt2_config() -> GPT2Config:
    return GPT2Config(
        vocab_size=BYTE_VOCAB_SIZE,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=512,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        initializer_range=0.2,  # the default 0.02 makes a random GPT-2 repeat one token forever
    )


def peft_config(kind: str, num_virtual_tokens: int, task_type: str = "CAUSAL_LM", **settings: Any):
    """One adapter kind as a PEFT config, for any task type (the seq2seq and NLU fixtures use it too); `settings`:
    what PEFT cannot read off the backbone's config (MPT's head count, under its own name n_heads)."""
    common = {"task_type": task_type, "num_virtual_tokens": num_virtual_tokens, **settings}
    if kind == "prompt_tuning":
        return PromptTuningConfig(**common)
    if kind == "p_tuning_mlp":
        return PromptEncoderConfig(**common, encoder_hidden_size=32)
    if kind == "p_tuning_lstm":
        return PromptEncoderConfig(
            **common,
            encoder_hidden_size=32,
            encoder_reparameterization_type=PromptEncoderReparameterizationType.LSTM,
        )
    if kind == "prefix":
        return PrefixTuningConfig(**common)
    if kind == "prefix_projection":
        return PrefixTuningConfig(**common, prefix_projection=True, encoder_hidden_size=32)
    raise ValueError(f"unknown adapter kind {kind!r}")


def write_peft_adapter(
    backbone_dir: Path, kind: str, out_dir: Path, num_virtual_tokens: int, seed: int, **settings: Any
) -> Path:
    """Randomise an adapter's trainable weights (so it matters) and save it with PEFT's own save_pretrained."""
    torch.manual_seed(seed)
    config = peft_config(kind, num_virtual_tokens, **settings)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(backbone_dir), config)
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.normal_(0.0, 1.0)
    model.save_pretrained(out_dir)
    return out_dir


def strengthen(model: torch.nn.Module, seed: int) -> None:
    """Make every kind of parameter matter: norm weights away from 1, biases away from 0 (a random init leaves
    them at 1 and 0, so a wrong norm or bias would not move the logits); each family's init keeps the rest."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim != 1:
                continue
            noise = torch.randn(parameter.shape, generator=generator) * 0.3
            if "norm" in name.lower() or "ln" in name.lower():
                parameter.add_(noise)
            elif name.endswith("bias"):
                parameter.copy_(noise)


def write_strong_backbone(config: PretrainedConfig, directory: Path, seed: int, auto: Any = None) -> Path:
    """A seeded random model of `config`, strengthened, saved with the byte tokenizer for `from_pretrained`."""
    model = seeded_model(auto or AutoModelForCausalLM, config, seed)
    strengthen(model, seed)
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


@dataclass
class TinyBackbone:
    arch: str
    path: Path
    adapters: dict[str, Path] = field(default_factory=dict)  # kind -> PEFT adapter directory


VIRTUAL_TOKENS = {"prompt_tuning": 5, "p_tuning_mlp": 4, "p_tuning_lstm": 3, "prefix": 3, "prefix_projection": 6}


def build_tiny_backbone(arch: str, root: Path) -> TinyBackbone:
    config = tiny_llama_config() if arch == "llama" else tiny_gpt2_config()
    path = write_strong_backbone(config, root / arch, seed=1234)
    backbone = TinyBackbone(arch=arch, path=path)
    for seed, kind in enumerate(ADAPTER_KINDS):
        out = root / f"{arch}-{kind}"
        backbone.adapters[kind] = write_peft_adapter(path, kind, out, VIRTUAL_TOKENS[kind], seed=seed)
    return backbone


def with_chat_template(backbone_dir: Path, out_dir: Path) -> Path:
    """A copy of a backbone whose tokenizer has CHAT_TEMPLATE."""
    shutil.copytree(backbone_dir, out_dir)
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return out_dir


def load_causal(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path).eval()
