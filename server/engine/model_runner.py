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

from prompt_store.types import DeviceTask
from server.engine.backbone import Backbone
from server.engine.batch import Batch, cache_from, cache_keys, cache_values
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
        keys, values = self.prefix_kv(rows, past_len)
        cache = cache_from(keys, values)
        logits = self.model(
            inputs_embeds=self.input_embeds(rows, lengths),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        batch = Batch(rows, attention_mask, cache, next_positions=attention_mask.sum(-1))
        return batch, logits[:, -1].float()

    @torch.inference_mode()
    def decode(self, batch: Batch, token_ids: torch.Tensor) -> tuple[Batch, torch.Tensor]:
        """Feed each row its last token; the cache grows by one column. Returns logits [B, V]."""
        ones = batch.attention_mask.new_ones((batch.size, 1))
        attention_mask = torch.cat([batch.attention_mask, ones], dim=1)  # [B, L + 1]
        logits = self.model(
            input_ids=token_ids.to(self.device)[:, None],
            attention_mask=attention_mask,
            position_ids=batch.next_positions[:, None],
            past_key_values=batch.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        grown = Batch(batch.rows, attention_mask, batch.cache, next_positions=batch.next_positions + 1)
        return grown, logits[:, -1].float()

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

    def prefix_kv(self, rows: list[Sequence], past_len: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer [B, kv_heads, past_len, head_dim]: each prefix row's task prefix, right-aligned."""
        if past_len == 0:
            return [], []
        fp = self.backbone.fingerprint
        shape = (len(rows), fp.num_key_value_heads, past_len, fp.head_dim)
        dtype = self.backbone.dtype
        keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(self.num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(self.num_layers)]
        for b, row in enumerate(rows):
            task = row.device_task
            if task is None or not task.prefix_keys:
                continue
            start = past_len - task.num_virtual_tokens
            for layer in range(self.num_layers):
                keys[layer][b, :, start:] = task.prefix_keys[layer]  # [kv_heads, P, head_dim]
                values[layer][b, :, start:] = task.prefix_values[layer]
        return keys, values


@torch.inference_mode()
def virtual_token_kv(backbone: Backbone, task: DeviceTask) -> DeviceTask:
    """A prompt task as the keys and values its virtual tokens leave in every layer.

    Virtual tokens come first and attend only to each other, so what they leave in the KV cache is the same for
    every input: computed once per task version, it turns a prompt row into a prefix row that skips them at
    prefill. Prefix tasks pass through unchanged.
    """
    if task.prompt_embeds is None:
        return task
    num_virtual = task.prompt_embeds.shape[0]
    cache = cache_from([], [])
    backbone.model(
        inputs_embeds=task.prompt_embeds[None].to(backbone.dtype),
        attention_mask=torch.ones((1, num_virtual), dtype=torch.long, device=backbone.device),
        position_ids=torch.arange(num_virtual, device=backbone.device)[None],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    keys = [layer[0].contiguous() for layer in cache_keys(cache)]  # [kv_heads, P, head_dim]
    values = [layer[0].contiguous() for layer in cache_values(cache)]
    return replace(task, prompt_embeds=None, prefix_keys=keys, prefix_values=values)


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
