"""Turns a validated CPU artifact into the device tensors the model runner consumes.

Prefix layout follows PEFT's `get_prompt`: view(P, 2L, kv_heads, head_dim), permute, layer i = (2i, 2i+1).

Encoder-decoder backbones, as PEFT 0.21 uses their adapters (tests/seq2seq_fixtures.py checks it):
- prompt tuning and P-tuning save 2P virtual tokens, but only the first P reach the model, before the encoder's
  input; the other P are never used.
- a prefix reaches the decoder's self-attention only. PEFT doubles the L slots along the layer axis and hands
  decoder layer l the slot (2 * l) % L (the odd slots would go to cross-attention, whose cache PEFT empties).
"""

from __future__ import annotations

import torch

from prompt_store.adapter import check_tensor_shape
from prompt_store.types import BackboneFingerprint, DeviceTask, TaskArtifact


def materialize(
    artifact: TaskArtifact, fingerprint: BackboneFingerprint, device: torch.device | str, dtype: torch.dtype
) -> DeviceTask:
    record = artifact.record
    num_virtual = record.num_virtual_tokens
    # Re-checked here because an artifact may come from a store opened with another backbone.
    check_tensor_shape(artifact.prompt_embeddings, record.method, num_virtual, fingerprint)
    # Cast and move before reshaping so the permute copy happens on the device.
    rows = artifact.prompt_embeddings.to(device=device, dtype=dtype)
    task = DeviceTask(key=artifact.key, method=record.method, num_virtual_tokens=num_virtual)
    if not record.method.is_prefix:
        task.prompt_embeds = rows[:num_virtual].contiguous()  # [P, hidden]; a seq2seq adapter's encoder prompt
        return task
    task.prefix_keys, task.prefix_values = layer_prefix(*split_prefix(rows, fingerprint), fingerprint)
    return task


def layer_prefix(
    keys: list[torch.Tensor], values: list[torch.Tensor], fingerprint: BackboneFingerprint
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer the prefix enters, the saved layer's keys and values PEFT gives it (`prefix_layers`)."""
    layers = fingerprint.prefix_layers
    return [keys[s] for s in layers], [values[s] for s in layers]


def split_prefix(rows: torch.Tensor, fingerprint: BackboneFingerprint) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """[P, L*2*kv_dim] -> per layer keys and values, each [kv_heads, P, head_dim]."""
    num_virtual = rows.shape[0]
    fp = fingerprint
    kv = rows.view(num_virtual, fp.num_layers * 2, fp.num_key_value_heads, fp.head_dim)  # [P, 2L, kv_heads, head_dim]
    kv = kv.permute(1, 2, 0, 3).contiguous()  # [2L, kv_heads, P, head_dim]
    keys = [kv[2 * layer] for layer in range(fp.num_layers)]  # each [kv_heads, P, head_dim], contiguous
    values = [kv[2 * layer + 1] for layer in range(fp.num_layers)]
    return keys, values


def join_prefix(keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of `split_prefix`: per layer [kv_heads, P, head_dim] keys and values -> PEFT's [P, L*2*kv_dim]."""
    kv = torch.stack([t for pair in zip(keys, values, strict=True) for t in pair])  # [2L, kv_heads, P, head_dim]
    return kv.permute(2, 0, 1, 3).reshape(kv.shape[2], -1)  # [P, 2L * kv_heads * head_dim]
