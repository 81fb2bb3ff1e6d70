"""Test helpers: a backbone fingerprint from a saved config, and adapters rewritten to be wrong in one way."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import AutoConfig

from prompt_store.adapter import CONFIG_NAME, MODEL_NAME, TENSOR_KEY
from prompt_store.types import BackboneFingerprint


def fingerprint_of(model_dir: Path) -> BackboneFingerprint:
    config = AutoConfig.from_pretrained(model_dir).get_text_config()
    num_heads = config.num_attention_heads
    return BackboneFingerprint(
        model_type=config.model_type,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
        vocab_size=config.vocab_size,
    )


def read_adapter(adapter_dir: Path) -> tuple[bytes, bytes]:
    return (adapter_dir / CONFIG_NAME).read_bytes(), (adapter_dir / MODEL_NAME).read_bytes()


def adapter_parts(adapter_dir: Path) -> tuple[dict[str, Any], torch.Tensor]:
    config, model = read_adapter(adapter_dir)
    return json.loads(config), load_safetensors(model)[TENSOR_KEY]


def config_bytes(config: dict[str, Any]) -> bytes:
    return json.dumps(config).encode()


def model_bytes(tensor: torch.Tensor, key: str = TENSOR_KEY, **extra: torch.Tensor) -> bytes:
    tensors = {name: value.contiguous() for name, value in {key: tensor, **extra}.items()}
    return save_safetensors(tensors, metadata={"format": "pt"})


def pickled_bytes(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save({TENSOR_KEY: tensor}, buffer)
    return buffer.getvalue()
