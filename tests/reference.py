"""What the engine and the store are held to, each computed so it cannot share the bug it checks.

- `peft_greedy`: PEFT's own forward over the whole sequence at every step, no cache and no `generate`.
- `by_definition_greedy`: the papers' definitions on the bare backbone, with eager attention written here: a prompt
  task's vectors before the input embeddings; a prefix task's keys and values before every layer's own.
- `peft_generate`: PEFT's `generate`, only where it is known to be right (`PEFT_GENERATE_BROKEN` says where not).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from peft import PeftModel
from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedModel

from prompt_store.types import DeviceTask
from server.engine.reference import LogitsOf, forward_logits, greedy_uncached, is_done, peft_generate_broken_reason
from tests.fixtures import EOS_ID, PAD_ID, TinyBackbone

DEFINITION_ATTENTION = "tests_by_definition"


PEFT_GENERATE_BROKEN = peft_generate_broken_reason()


def peft_model(tiny: TinyBackbone, kind: str | None) -> PreTrainedModel | PeftModel:
    """The bare backbone (kind None), or it under the PEFT adapter of that kind, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(tiny.path).eval()
    return model if kind is None else PeftModel.from_pretrained(model, tiny.adapters[kind]).eval()


def peft_greedy(model: PreTrainedModel | PeftModel, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens (through EOS) of one row under PEFT's forward, without a cache."""
    return greedy_uncached(forward_logits(model), torch.tensor([input_ids]), max_new_tokens, {EOS_ID})[0]


@torch.inference_mode()
def peft_generate(model: PreTrainedModel | PeftModel, input_ids: list[int], max_new_tokens: int) -> list[int]:
    """PEFT's own `generate`, greedy, for one row; check PEFT_GENERATE_BROKEN first."""
    ids = torch.tensor([input_ids])
    mask = torch.ones_like(ids)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD_ID
    )
    return out[0, ids.shape[1] :].tolist()


def by_definition_greedy(
    tiny: TinyBackbone, task: DeviceTask | None, input_ids: list[int], max_new_tokens: int
) -> list[int]:
    """Greedy tokens of one row on the bare backbone with `task` (float32, CPU) applied as the papers define it."""
    model = AutoModelForCausalLM.from_pretrained(tiny.path, attn_implementation=DEFINITION_ATTENTION).eval()
    logits_of = definition_logits(model, task)
    return greedy_uncached(logits_of, torch.tensor([input_ids]), max_new_tokens, {EOS_ID})[0]


def definition_logits(model: PreTrainedModel, task: DeviceTask | None) -> LogitsOf:
    prompt = task.prompt_embeds if task is not None else None
    prefix = task if task is not None and task.prefix_keys else None
    num_prefix = prefix.num_virtual_tokens if prefix is not None else 0

    def logits_of(input_ids: torch.Tensor) -> torch.Tensor:
        embeds = model.get_input_embeddings()(input_ids)  # [1, T, H]
        if prompt is not None:
            embeds = torch.cat([prompt[None], embeds], dim=1)  # [1, P + T, H]
        positions = torch.arange(num_prefix, num_prefix + embeds.shape[1])[None]  # after the prefix, if any
        return model(inputs_embeds=embeds, position_ids=positions, use_cache=False, definition_prefix=prefix).logits

    return logits_of


def definition_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal softmax attention over [prefix ; own] keys and values, written out (eager, no SDPA)."""
    prefix: DeviceTask | None = kwargs.get("definition_prefix")
    if prefix is not None:
        layer = module.layer_idx
        key = torch.cat([prefix.prefix_keys[layer][None], key], dim=2)  # [1, kv_heads, P + T, head_dim]
        value = torch.cat([prefix.prefix_values[layer][None], value], dim=2)
    repeats = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)  # [1, heads, P+T, d]
    num_new, num_keys = query.shape[2], key.shape[2]
    scores = query @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    visible = torch.arange(num_keys)[None, :] <= torch.arange(num_keys - num_new, num_keys)[:, None]  # [T, P + T]
    weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return (weights @ value).transpose(1, 2).contiguous(), None  # [1, T, heads, head_dim]


AttentionInterface.register(DEFINITION_ATTENTION, definition_attention)


@torch.inference_mode()
def greedy_with_logprobs(
    model: Any, input_ids: list[int], max_new_tokens: int, eos_token_ids: Collection[int]
) -> tuple[list[int], list[float]]:
    """One row's greedy tokens (through EOS) and each one's log-probability, from the model's forward over the whole
    sequence at every step (a PEFT model: its own forward, no cache), in float32."""
    tokens: list[int] = []
    logprobs: list[float] = []
    while len(tokens) < max_new_tokens and not is_done(tokens, eos_token_ids):
        ids = torch.tensor([input_ids + tokens])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
        row = logits.float().log_softmax(dim=-1)
        tokens.append(int(row.argmax()))
        logprobs.append(float(row.max()))
    return tokens, logprobs
