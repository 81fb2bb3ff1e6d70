"""Builds the step's tensors in one place and runs the frozen backbone: prefill new rows, decode the batch.

Three kinds of rows share one forward pass:
- prompt rows (prompt tuning, P-tuning): inputs_embeds = [P_task ; embed(x)]
- prefix rows (prefix tuning, P-Tuning v2): the task's per-layer keys/values open the row's KV cache
- plain rows: embed(x) on the bare backbone
Positions come from the attention mask, so a prefix row's tokens continue after its prefix.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import PreTrainedModel

from prompt_store.types import DeviceTask
from server.engine.attention import ATTENTION_NAME, KV_KWARG, StepKV
from server.engine.backbone import Backbone
from server.engine.batch import Batch, new_kv, step_kv
from server.engine.request import Sequence


class ModelRunner:
    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self.model = backbone.model
        self.device = backbone.device
        self.embed_tokens = backbone.model.get_input_embeddings()
        self.num_layers = backbone.fingerprint.num_layers

    @torch.inference_mode()
    def prefill(self, rows: list[Sequence]) -> tuple[Batch, torch.Tensor]:
        """Run the new rows' inputs; returns their batch and the last position's logits [B, V]."""
        lengths = [row_input_length(row) for row in rows]
        past_len = max((row.num_virtual_tokens for row in rows if row.is_prefix), default=0)
        attention_mask = prefill_mask(rows, lengths, past_len).to(self.device)  # [B, past + T]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past_len:]  # [B, T]
        keys, values = self.prefix_kv(rows, past_len, attention_mask.shape[1])
        kv = step_kv(keys, values, attention_mask, past_len, position_ids)
        logits = self.forward(kv, inputs_embeds=self.input_embeds(rows, lengths), position_ids=position_ids)
        batch = Batch(rows, attention_mask, keys, values, next_positions=attention_mask.sum(-1))
        return batch, logits

    @torch.inference_mode()
    def decode(self, batch: Batch, token_ids: torch.Tensor) -> tuple[Batch, torch.Tensor]:
        """Feed each row its last token; the batch grows by one column. Returns logits [B, V]."""
        grown, kv = batch.decode_kv()
        logits = self.forward(
            kv, input_ids=token_ids.to(self.device)[:, None], position_ids=batch.next_positions[:, None]
        )
        return grown, logits

    def forward(self, kv: StepKV, **inputs: torch.Tensor) -> torch.Tensor:
        """One pass of the backbone over the engine's keys and values; the last position's logits [B, V]."""
        return run_backbone(self.model, self.num_layers, kv, **inputs)

    def input_embeds(self, rows: list[Sequence], lengths: list[int]) -> torch.Tensor:
        """[B, T, H]: each row right-aligned; a prompt row's virtual tokens sit just before its input."""
        width = max(lengths)
        token_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            ids = row.request.input_ids
            token_ids[b, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        embeds = self.embed_tokens(token_ids.to(self.device))  # [B, T, H]
        for b, row in enumerate(rows):
            if row.device_task is not None and row.device_task.prompt_embeds is not None:
                start = width - lengths[b]
                prompt = row.device_task.prompt_embeds  # [P, H]
                embeds[b, start : start + prompt.shape[0]] = prompt.to(embeds.dtype)
        return embeds

    def prefix_kv(
        self, rows: list[Sequence], past_len: int, length: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer buffers for `length` columns [B, kv_heads, capacity, head_dim]: each prefix row's task prefix
        right-aligned in the first `past_len`, the rest zero."""
        fp = self.backbone.fingerprint
        like = torch.empty((), dtype=self.backbone.dtype, device=self.device)
        keys = [new_kv(like, len(rows), fp.num_key_value_heads, length, fp.head_dim) for _ in range(self.num_layers)]
        values = [new_kv(like, len(rows), fp.num_key_value_heads, length, fp.head_dim) for _ in range(self.num_layers)]
        for b, row in enumerate(rows):
            task = row.device_task
            if task is None or not task.prefix_keys:
                continue
            start = past_len - task.num_virtual_tokens
            for layer in range(self.num_layers):
                keys[layer][b, :, start:past_len] = task.prefix_keys[layer]  # [kv_heads, P, head_dim]
                values[layer][b, :, start:past_len] = task.prefix_values[layer]
        return keys, values


def run_backbone(model: PreTrainedModel, num_layers: int, kv: StepKV, **inputs: torch.Tensor) -> torch.Tensor:
    """One forward pass without a transformers cache: attention reads and writes `kv`. Returns logits [B, V]."""
    logits = model(**inputs, use_cache=False, logits_to_keep=1, **{KV_KWARG: kv}).logits
    if kv.num_layers_written != num_layers:
        raise RuntimeError(
            f"{type(model).__name__}: {kv.num_layers_written} of {num_layers} layers ran their attention through "
            f"the {ATTENTION_NAME!r} AttentionInterface function; promptserve serves only models whose every "
            "attention layer does"
        )
    return logits[:, -1].float()


@torch.inference_mode()
def virtual_token_kv(backbone: Backbone, task: DeviceTask) -> DeviceTask:
    """A prompt task as the keys and values its virtual tokens leave in every layer.

    Virtual tokens come first and attend only to each other, so what they leave in the KV cache is the same for
    every input: computed once per task version, it turns a prompt row into a prefix row that skips them at
    prefill. Prefix tasks pass through unchanged.
    """
    if task.prompt_embeds is None:
        return task
    fp, num_virtual = backbone.fingerprint, task.prompt_embeds.shape[0]
    embeds = task.prompt_embeds[None].to(backbone.dtype)  # [1, P, H]
    keys = [new_kv(embeds, 1, fp.num_key_value_heads, num_virtual, fp.head_dim) for _ in range(fp.num_layers)]
    values = [new_kv(embeds, 1, fp.num_key_value_heads, num_virtual, fp.head_dim) for _ in range(fp.num_layers)]
    positions = torch.arange(num_virtual, device=backbone.device)[None]  # [1, P]
    kv = step_kv(keys, values, torch.ones_like(positions), 0, positions)
    run_backbone(backbone.model, fp.num_layers, kv, inputs_embeds=embeds, position_ids=positions)
    return replace(
        task,
        prompt_embeds=None,
        prefix_keys=[k[0, :, :num_virtual].contiguous() for k in keys],  # [kv_heads, P, head_dim]
        prefix_values=[v[0, :, :num_virtual].contiguous() for v in values],
    )


def row_input_length(row: Sequence) -> int:
    """Positions the row feeds as new inputs at prefill: its input, after its virtual tokens if it has any."""
    virtual = 0 if row.is_prefix else row.num_virtual_tokens
    return virtual + row.request.num_input_tokens


def prefill_mask(rows: list[Sequence], lengths: list[int], past_len: int) -> torch.Tensor:
    """[B, past_len + T]: a prefix row's prefix ends at column past_len; inputs end at the last column."""
    width = max(lengths)
    mask = torch.zeros((len(rows), past_len + width), dtype=torch.long)
    for b, row in enumerate(rows):
        mask[b, past_len + width - lengths[b] :] = 1
        if row.is_prefix:
            mask[b, past_len - row.num_virtual_tokens : past_len] = 1
    return mask
