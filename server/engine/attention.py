"""Attention over keys and values the engine owns, plugged into unmodified transformers models.

The backbone loads with `attn_implementation=ATTENTION_NAME`, registered in transformers' public `AttentionInterface`.
The model is called without a cache; each layer computes its new keys and values as usual and hands them to `attend`,
which stores them in the step's `StepKV` (passed down as the keyword argument `KV_KWARG`) and attends over all the row
holds. No transformers cache class is used, subclassed or reached into.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface

ATTENTION_NAME = "promptserve"
KV_KWARG = "promptserve_kv"


@dataclass(slots=True)
class StepKV:
    """One forward pass's view of the batch's keys and values, and who may attend to what.

    Buffers hold per layer [B, kv_heads, capacity, head_dim]; this pass writes its T new columns at `start`.
    `key_positions` [B, start + T] gives each column's position, `key_valid` [B, start + T] whether the row holds it
    (left padding does not); `query_positions` [B, T].
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    start: int
    key_positions: torch.Tensor
    key_valid: torch.Tensor
    query_positions: torch.Tensor
    num_layers_written: int = 0
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by sliding window

    @property
    def end(self) -> int:
        return self.key_valid.shape[1]

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's keys and values [B, kv_heads, T, head_dim]; returns all the layer holds up to `end`."""
        self.keys[layer][:, :, self.start : self.end] = key
        self.values[layer][:, :, self.start : self.end] = value
        self.num_layers_written += 1
        return self.keys[layer][:, :, : self.end], self.values[layer][:, :, : self.end]

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """[B, 1, T, end] bool: a query sees the row's own columns at or before its position (within the window)."""
        if sliding_window not in self.masks:
            self.masks[sliding_window] = self.build_mask(sliding_window)
        return self.masks[sliding_window]

    def build_mask(self, sliding_window: int | None) -> torch.Tensor:
        distance = self.query_positions[:, :, None] - self.key_positions[:, None, :]  # [B, T, end]
        allowed = self.key_valid[:, None, :] & (distance >= 0)
        if sliding_window is not None:
            allowed &= distance < sliding_window
        # A padding query sees itself, so no row of the softmax is empty (an empty one is NaN, and NaN poisons)
        num_new = self.query_positions.shape[1]
        diagonal = torch.arange(num_new, device=allowed.device)
        allowed[:, diagonal, self.start + diagonal] = True
        return allowed[:, None]


def attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function: query [B, heads, T, head_dim]; returns [B, T, heads, head_dim]."""
    kv = kwargs.get(KV_KWARG)
    if not isinstance(kv, StepKV):
        raise RuntimeError(f"attention {ATTENTION_NAME!r} runs only inside the promptserve engine (no {KV_KWARG})")
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"this backbone's attention uses {unsupported}, which promptserve cannot serve")
    keys, values = kv.write(module.layer_idx, key, value)  # type: ignore[arg-type]
    output = scaled_dot_product_attention(
        query,
        keys,
        values,
        attn_mask=kv.mask(kwargs.get("sliding_window")),
        scale=scaling,
        enable_gqa=query.shape[1] != keys.shape[1],
    )  # [B, heads, T, head_dim]
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, attend)
