"""Families whose attention is their own code, outside transformers' AttentionInterface (Bloom, Falcon, MPT), served
through the engine's attention: each attention layer is wrapped by a module that reuses the layer's own projections
and attends over the pool with the family's ALiBi bias (or, for Falcon's RoPE variants, its rotary embedding) at each
row's true positions. Called without the engine's state (the self-check's reference), a wrapper runs the layer itself.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from server.engine.attention import ATTENTION_NAME, KV_KWARG, Scoring, StepKV

REFERENCE_ATTENTION = "eager"  # a reference forward's, for a family the engine does not wrap
MPT_ALIBI_BIAS_MAX = 8  # transformers' MPT builds its bias with 8, whatever its attn_config says


@dataclass(frozen=True, slots=True)
class AlibiBias:
    """ALiBi for one layer: head h adds slopes[h] x (key position) / divisor to its logits. Softmax is shift-invariant
    per query row, so this equals slopes x (key - query), the paper's form. `rounding`: the dtype the family computes
    slope x position in (Falcon's is bfloat16)."""

    slopes: torch.Tensor  # [heads] float32
    divisor: float = 1.0
    rounding: torch.dtype | None = None

    def __call__(self, query_positions: torch.Tensor, num_keys: int) -> torch.Tensor:
        """query_positions [R, T] -> bias [1, heads, 1, num_keys] (key column = key position)."""
        device = query_positions.device
        heads = torch.arange(len(self.slopes), device=device)[:, None]  # [heads, 1]
        return self.at(heads, query_positions, torch.arange(num_keys, device=device))[None, :, None, :]

    def at(self, head: torch.Tensor, query_position: torch.Tensor, key_position: torch.Tensor) -> torch.Tensor:
        """slopes[head] x key position / divisor, elementwise (query_position unused: see the class)."""
        slopes = self.slopes if self.slopes.device == key_position.device else self.slopes.to(key_position.device)
        if self.rounding is not None:
            bias = (slopes.to(self.rounding)[head] * key_position).float()
        else:
            bias = slopes[head] * key_position
        return bias / self.divisor if self.divisor != 1.0 else bias


def bloom_slopes(num_heads: int) -> torch.Tensor:
    """[heads] Press et al.'s slopes, as Bloom and Falcon compute them (in float32): the geometric sequence
    (2^(-8/n))^i, i = 1..n, for the largest power of two n <= heads, then its odd terms for 2n, for the heads left."""
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(2 ** (-8 / closest), torch.arange(1, closest + 1))
    extra = geometric(2 ** (-8 / (2 * closest)), torch.arange(1, 1 + 2 * (num_heads - closest), 2))
    return torch.cat([slopes, extra])


def geometric(base: float, powers: torch.Tensor) -> torch.Tensor:
    return torch.pow(torch.tensor(base, dtype=torch.float32), powers.to(torch.int32))


def mpt_slopes(num_heads: int, bias_max: int = MPT_ALIBI_BIAS_MAX) -> torch.Tensor:
    """[heads] MPT's slopes (in float32): 2^(-bias_max * i / n), i = 1..n, n the next power of two >= heads; when
    heads is not a power of two, the even-indexed i first, then the odd, the first `heads` of them."""
    padded = 2 ** math.ceil(math.log2(num_heads))
    slopes = 1.0 / torch.pow(2, torch.arange(1, padded + 1).float() * (bias_max / padded))
    if padded != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


class EngineState:
    """The step's StepKV while the engine runs the model (None otherwise), shared by the model's wrapped layers:
    these families' decoder layers do not pass keyword arguments on to their attention."""

    def __init__(self) -> None:
        self.kv: StepKV | None = None

    def capture(self, _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """A forward pre-hook on the whole model: take the engine's KV out of its keyword arguments."""
        self.kv = kwargs.pop(KV_KWARG, None)
        return args, kwargs


class Family:
    """One family's attention layers: where they are, their q/k/v and output, their bias."""

    model_type: str
    stock_attention = "eager"  # what transformers loads it with by default, so PEFT's forward runs: the reference
    # while the engine runs it: for a custom attention function transformers builds no mask (nor Falcon its
    # [heads, N, N] ALiBi mask) over the packed stream, which the wrapped layers would not read
    engine_attention = ATTENTION_NAME

    def refusal(self, config: PretrainedConfig) -> str | None:
        return None

    def num_kv_heads(self, config: PretrainedConfig) -> int | None:
        """The key-value heads its layers attend with, where the config does not say (None: it does)."""
        return None

    def takes_prefix(self, config: PretrainedConfig) -> bool:
        """Whether PEFT's prefix tuning runs on it."""
        return True

    def layers(self, model: PreTrainedModel) -> list[tuple[torch.nn.Module, str]]:
        """(parent, attribute) of each attention layer, in layer order."""
        raise NotImplementedError

    def project(self, layer: Any, hidden: torch.Tensor, kwargs: dict[str, Any]) -> QKV:
        raise NotImplementedError

    def bias(self, layer: Any) -> AlibiBias | None:
        raise NotImplementedError

    def finish(self, layer: Any, attended: torch.Tensor, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """The layer's own return value from the attention's output [1, N, heads * head_dim]."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class QKV:
    query: torch.Tensor  # [1, heads, N, head_dim]
    key: torch.Tensor  # [1, kv_heads, N, head_dim]
    value: torch.Tensor
    scaling: float


def split_heads(fused: torch.Tensor, num_heads: int, head_dim: int) -> list[torch.Tensor]:
    """[1, N, heads * 3 * d], interleaved per head (Bloom, Falcon) -> 3 x [1, heads, N, d]."""
    batch, length, _ = fused.shape
    per_head = fused.view(batch, length, num_heads, 3, head_dim)
    return [per_head[..., i, :].transpose(1, 2) for i in range(3)]


class Bloom(Family):
    """Bloom: scores x 1/sqrt(d) + ALiBi (BloomAttention's baddbmm), its residual added in the attention."""

    model_type = "bloom"

    def layers(self, model: PreTrainedModel) -> list[tuple[torch.nn.Module, str]]:
        return [(block, "self_attention") for block in model.base_model.h]  # type: ignore[union-attr]

    def project(self, layer: Any, hidden: torch.Tensor, kwargs: dict[str, Any]) -> QKV:
        query, key, value = split_heads(layer.query_key_value(hidden), layer.num_heads, layer.head_dim)
        return QKV(query, key, value, float(layer.inv_norm_factor))

    def bias(self, layer: Any) -> AlibiBias:
        return AlibiBias(bloom_slopes(layer.num_heads))

    def finish(self, layer: Any, attended: torch.Tensor, args: tuple[Any, ...]) -> tuple[Any, ...]:
        residual = args[0]  # BloomBlock calls its attention as (hidden_states, residual, **keywords)
        return layer.dense(attended) + residual, None


class Falcon(Family):
    """Falcon: ALiBi (alibi=True) or RoPE, one key-value head per query head or grouped ones shared
    (new_decoder_architecture). PEFT's forward runs Falcon with its default SDPA attention, where the bias rides in
    the mask as ALiBi / sqrt(d) and SDPA scales the scores by 1/sqrt(d): (scores + alibi) / sqrt(d). That is the
    reference matched here (Falcon's eager path adds the bias twice, once in its logits and again in that mask)."""

    model_type = "falcon"
    stock_attention = "sdpa"

    @staticmethod
    def is_multi_query(config: PretrainedConfig) -> bool:
        return bool(config.multi_query and not config.new_decoder_architecture)

    def num_kv_heads(self, config: PretrainedConfig) -> int:
        """One for multi-query Falcon; one per query head otherwise (new_decoder_architecture's grouped heads are
        repeated per query head, as Falcon's attention and cache hold them)."""
        return 1 if self.is_multi_query(config) else int(config.num_attention_heads)

    def takes_prefix(self, config: PretrainedConfig) -> bool:
        """Not multi-query Falcon: PEFT's prefix holds a key per query head, its attention one (PEFT's forward
        fails)."""
        return not self.is_multi_query(config)

    def layers(self, model: PreTrainedModel) -> list[tuple[torch.nn.Module, str]]:
        return [(block, "self_attention") for block in model.base_model.h]  # type: ignore[union-attr]

    def project(self, layer: Any, hidden: torch.Tensor, kwargs: dict[str, Any]) -> QKV:
        fused = layer.query_key_value(hidden)  # [1, N, (heads + 2 * kv_heads) * d] or [1, N, heads * 3 * d]
        if layer.new_decoder_architecture:
            query, key, value = self.grouped_heads(fused, layer.num_heads, layer.num_kv_heads, layer.head_dim)
        elif layer.multi_query:
            query, key, value = self.shared_heads(fused, layer.num_heads, layer.head_dim)
        else:
            query, key, value = split_heads(fused, layer.num_heads, layer.head_dim)
        if not layer.config.alibi:
            cos, sin = kwargs["position_embeddings"]  # [1, N, d] at the stream's positions
            query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        return QKV(query, key, value, 1.0 / math.sqrt(layer.head_dim))

    @staticmethod
    def grouped_heads(fused: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> list[torch.Tensor]:
        """[1, N, kv_heads * (group + 2) * d] -> query [1, heads, N, d], key and value repeated to [1, heads, N, d]
        as Falcon's own attention repeats them (so its cache, and PEFT's prefix, hold one per query head)."""
        batch, length, _ = fused.shape
        grouped = fused.view(batch, length, kv_heads, heads // kv_heads + 2, head_dim)
        query = grouped[:, :, :, :-2]  # [1, N, kv_heads, group, d]
        key, value = (grouped[:, :, :, [i]].expand(query.shape) for i in (-2, -1))
        return [x.flatten(2, 3).transpose(1, 2) for x in (query, key, value)]

    @staticmethod
    def shared_heads(fused: torch.Tensor, heads: int, head_dim: int) -> list[torch.Tensor]:
        """[1, N, (heads + 2) * d] -> query [1, heads, N, d], one key and value [1, 1, N, d] (multi-query)."""
        batch, length, _ = fused.shape
        per_head = fused.view(batch, length, heads + 2, head_dim)
        return [x.transpose(1, 2) for x in (per_head[:, :, :-2], per_head[:, :, -2:-1], per_head[:, :, -1:])]

    def bias(self, layer: Any) -> AlibiBias | None:
        if not layer.config.alibi:
            return None
        return AlibiBias(bloom_slopes(layer.num_heads), math.sqrt(layer.head_dim), torch.bfloat16)

    def finish(self, layer: Any, attended: torch.Tensor, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return layer.dense(attended), None


def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE with halves rotated (Falcon's): states [1, h, N, d], cos and sin [1, N, d]."""
    first, second = states.chunk(2, dim=-1)
    return states * cos[:, None] + torch.cat((-second, first), dim=-1) * sin[:, None]


class Mpt(Family):
    """MPT: scores x softmax_scale + ALiBi; clip_qkv clamps the fused projection as MPT's attention does."""

    model_type = "mpt"
    engine_attention = "eager"  # MptModel's forward needs a mask to exist (it casts it to bool)

    def refusal(self, config: PretrainedConfig) -> str | None:
        attn = config.attn_config
        if attn.qk_ln:
            return "its attn_config.qk_ln is set, which transformers' MPT ignores (PEFT's forward would not apply it)"
        if not attn.alibi:
            return "its attn_config.alibi is off, which transformers' MPT ignores (it always applies ALiBi)"
        if attn.alibi_bias_max != MPT_ALIBI_BIAS_MAX:
            return (
                f"its attn_config.alibi_bias_max is {attn.alibi_bias_max}, which transformers' MPT ignores "
                f"(it uses {MPT_ALIBI_BIAS_MAX})"
            )
        return None

    def layers(self, model: PreTrainedModel) -> list[tuple[torch.nn.Module, str]]:
        return [(block, "attn") for block in model.base_model.blocks]  # type: ignore[union-attr]

    def project(self, layer: Any, hidden: torch.Tensor, kwargs: dict[str, Any]) -> QKV:
        fused = layer.Wqkv(hidden)  # [1, N, 3 * heads * d]
        if layer.clip_qkv:
            fused = fused.clamp(min=-layer.clip_qkv, max=layer.clip_qkv)
        batch, length, _ = fused.shape
        query, key, value = (
            part.reshape(batch, length, layer.n_heads, layer.head_dim).transpose(1, 2) for part in fused.chunk(3, dim=2)
        )  # each [1, heads, N, d]
        return QKV(query, key, value, float(layer.softmax_scale))

    def bias(self, layer: Any) -> AlibiBias:
        return AlibiBias(mpt_slopes(layer.n_heads))

    def finish(self, layer: Any, attended: torch.Tensor, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return layer.out_proj(attended), None


FAMILIES: dict[str, Family] = {family.model_type: family for family in (Bloom(), Falcon(), Mpt())}


class PooledAttention(torch.nn.Module):
    """One attention layer of an adapted family: over the engine's pool while the engine runs the model, the layer's
    own forward otherwise."""

    def __init__(self, layer: Any, index: int, family: Family, state: EngineState) -> None:
        super().__init__()
        self.layer = layer
        self.index = index
        self.family = family
        self.state = state
        bias = family.bias(layer)
        device = next(layer.parameters()).device  # the slopes beside the keys: a compiled score_mod reads them there
        self.alibi = bias if bias is None else replace(bias, slopes=bias.slopes.to(device))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        kv = self.state.kv
        if kv is None:
            return self.layer(hidden_states, *args, **kwargs)
        qkv = self.family.project(self.layer, hidden_states, kwargs)
        kv.write(self.index, qkv.key, qkv.value)
        keys, values = kv.keys[self.index], kv.values[self.index]
        scoring = Scoring(qkv.scaling, bias=self.alibi)
        attended, _ = kv.backend.attend(qkv.query, qkv.key.shape[1], keys, values, kv.batches, scoring)
        return self.family.finish(self.layer, attended.flatten(2), args)  # [1, N, heads * d]


def family_of(config: PretrainedConfig) -> Family | None:
    return FAMILIES.get(config.model_type)


def refusal(config: PretrainedConfig) -> str | None:
    """Why an adapted family's checkpoint is not served (None: it is, or the family is not one of these)."""
    family = family_of(config)
    return family.refusal(config) if family is not None else None


def stock_attention(config: PretrainedConfig) -> str | None:
    """The stock attention an adapted family loads with and PEFT's forward runs it with (its default: Falcon's is
    SDPA, and its eager attention differs with ALiBi, see `Falcon`); None for any other model."""
    family = family_of(config)
    return family.stock_attention if family is not None else None


def num_kv_heads(config: PretrainedConfig) -> int | None:
    """The key-value heads an adapted family's layers attend with where its config does not say (None: it does)."""
    family = family_of(config)
    return family.num_kv_heads(config) if family is not None else None


def takes_prefix(config: PretrainedConfig) -> bool:
    family = family_of(config)
    return family.takes_prefix(config) if family is not None else True


def engine_attention(config: PretrainedConfig) -> str:
    """The attention implementation the model is set to while the engine runs it."""
    family = family_of(config)
    return family.engine_attention if family is not None else ATTENTION_NAME


@contextlib.contextmanager
def reference_attention(model: torch.nn.Module) -> Iterator[None]:
    """transformers' own eager attention for a reference forward (a family the engine wraps: the attention PEFT's
    forward runs it with), the engine's again after it."""
    config: PretrainedConfig = model.config  # type: ignore[assignment]
    model.set_attn_implementation(stock_attention(config) or REFERENCE_ATTENTION)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_attn_implementation(engine_attention(config))  # type: ignore[operator]


def install(model: PreTrainedModel) -> bool:
    """Wrap every attention layer of an adapted family's model; False (nothing done) for any other model."""
    family = family_of(model.config)
    if family is None:
        return False
    state = EngineState()
    for index, (parent, name) in enumerate(family.layers(model)):
        setattr(parent, name, PooledAttention(getattr(parent, name), index, family, state))
    model.register_forward_pre_hook(state.capture, with_kwargs=True)
    model.set_attn_implementation(family.engine_attention)
    return True
