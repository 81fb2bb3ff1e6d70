"""Encoder-decoder backbones (T5, BART): what the engine needs beyond the attention interface (the kind itself is
encoder_decoder.py's).

A seq2seq row's encoder input is its task's prompt (prompt tuning, P-tuning: PEFT puts it there) and its input; it
runs once, alone (no padding), when the row is admitted. The decoder runs in the engine's packed steps like a causal
row: its own tokens are the decoder start token and the answer, with a prefix task's keys and values in front of
them in self-attention. Cross-attention reads the row's encoder keys and values, written into the row's own blocks
in the pool's cross-attention layers by the step that starts the row (every decoder layer computes them from the
encoder output it is handed), so a joining row copies nobody's memory.

Two things transformers computes from the packed stream's shape, not per row, are made per row here:
- T5's relative position bias (decoder self-attention): computed in `attend` from each row's positions, with the
  backbone's own bias table and the paper's bucketing.
- BART's learned decoder positions: a forward hook on the decoder's position embedding returns each token's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from server.engine.attention import KV_KWARG, WHOLE_SEQUENCE


@dataclass(frozen=True, slots=True)
class RelativeBias:
    """T5's decoder self-attention bias: a learned value per (bucket of key - query distance, head)."""

    table: torch.nn.Embedding  # [num_buckets, heads]
    num_buckets: int
    max_distance: int

    def __call__(self, query_positions: torch.Tensor, num_keys: int) -> torch.Tensor:
        """query_positions [R, T] -> bias [R, heads, T, num_keys] (key column = key position)."""
        keys = torch.arange(num_keys, device=query_positions.device)
        buckets = self.bucket(keys[None, None, :] - query_positions[:, :, None])  # [R, T, L]
        return self.table(buckets).permute(0, 3, 1, 2)

    def at(self, head: torch.Tensor, query_position: torch.Tensor, key_position: torch.Tensor) -> torch.Tensor:
        """The same bias, elementwise (a FlexAttention score_mod calls it with scalars)."""
        return self.table.weight[self.bucket(key_position - query_position), head]

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        """Raffel et al.'s causal bucketing: exact distances up to half the buckets, then log-spaced."""
        distance = (-relative).clamp(min=0)
        exact = self.num_buckets // 2
        scaled = torch.log(distance.float().clamp(min=1) / exact) / math.log(self.max_distance / exact)
        large = (exact + (scaled * (self.num_buckets - exact)).to(torch.long)).clamp(max=self.num_buckets - 1)
        return torch.where(distance < exact, distance, large)


@dataclass(slots=True)
class DecoderPositions:
    """Learned decoder positions (BART) as hooks on the decoder's position embedding: while `positions` is set, the
    embedding answers for those positions ([1, N], each token's own), not for 0..N-1, and computes its own for one
    token only (a stream longer than the table would index past it)."""

    embedding: torch.nn.Embedding
    offset: int
    positions: torch.Tensor | None = field(default=None)

    def shorten(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The embedding's own call made for the first token only (its input's shape, or the positions transformers
        passes, are all it reads); `hook` then answers for every token."""
        if self.positions is None:
            return None
        if args and isinstance(args[0], torch.Tensor):
            args = (args[0][:, :1], *args[1:])  # [1, 1]
        if isinstance(kwargs.get("position_ids"), torch.Tensor):
            kwargs = {**kwargs, "position_ids": kwargs["position_ids"][..., :1]}
        return args, kwargs

    def hook(self, module: torch.nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        if self.positions is None:
            return output
        return torch.nn.functional.embedding(self.positions + self.offset, self.embedding.weight)


@dataclass(frozen=True, slots=True)
class Seq2Seq:
    decoder_start_id: int
    num_decoder_layers: int
    relative_bias: RelativeBias | None
    positions: DecoderPositions | None
    cross_attentions: frozenset[torch.nn.Module]  # the decoder's cross-attention modules (the rest: self-attention)


def seq2seq_of(model: PreTrainedModel) -> Seq2Seq:
    config = model.config
    decoder_start = getattr(model.generation_config, "decoder_start_token_id", None)
    decoder_start = decoder_start if decoder_start is not None else config.decoder_start_token_id
    if decoder_start is None:
        raise ValueError(f"{type(model).__name__}: expected a decoder_start_token_id in its config; found none")
    heads = (getattr(config, "encoder_attention_heads", None), getattr(config, "decoder_attention_heads", None))
    if None not in heads and heads[0] != heads[1]:
        raise ValueError(
            f"{type(model).__name__}: expected an encoder and a decoder with the same attention heads (the KV pool "
            f"is sized by them); found {heads[0]} and {heads[1]}"
        )
    decoder = model.get_decoder()
    attentions = [m for m in decoder.modules() if hasattr(m, "layer_idx") and getattr(m, "is_decoder", False)]
    num_layers = sum(1 for m in attentions if getattr(m, "is_causal", False))
    if not num_layers or len(attentions) != 2 * num_layers:
        raise ValueError(
            f"{type(model).__name__}: expected a decoder whose every layer has a self-attention and a cross-attention "
            f"module (is_decoder, is_causal, layer_idx, as T5 and BART have); found {len(attentions)} attention modules"
        )
    cross = frozenset(m for m in attentions if not getattr(m, "is_causal", False))
    return Seq2Seq(
        int(decoder_start), num_layers, relative_bias_of(decoder, config), decoder_positions_of(decoder), cross
    )


def relative_bias_of(decoder: torch.nn.Module, config: Any) -> RelativeBias | None:
    """T5's table lives in the decoder's first self-attention (`has_relative_attention_bias`); the others reuse it."""
    owner = next((m for m in decoder.modules() if getattr(m, "has_relative_attention_bias", False)), None)
    table = getattr(owner, "relative_attention_bias", None)
    if not isinstance(table, torch.nn.Embedding):
        return None
    return RelativeBias(table, config.relative_attention_num_buckets, config.relative_attention_max_distance)


def decoder_positions_of(decoder: torch.nn.Module) -> DecoderPositions | None:
    embedding = getattr(decoder, "embed_positions", None)
    if not isinstance(embedding, torch.nn.Embedding):
        return None
    positions = DecoderPositions(embedding, int(getattr(embedding, "offset", 0)))
    embedding.register_forward_pre_hook(positions.shorten, with_kwargs=True)
    embedding.register_forward_hook(positions.hook)
    return positions


@torch.inference_mode()
def encode(model: PreTrainedModel, embeds: torch.Tensor) -> torch.Tensor:
    """One row's encoder pass, alone: input embeddings [S, H] -> encoder output [S, H] (attention as transformers
    computes it, through `attend`'s path for one whole sequence)."""
    output: BaseModelOutput = model.get_encoder()(inputs_embeds=embeds[None], **{KV_KWARG: WHOLE_SEQUENCE})
    hidden = output.last_hidden_state
    assert hidden is not None
    return hidden[0]
