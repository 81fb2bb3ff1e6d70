"""Attention over keys and values the engine owns, plugged into unmodified transformers models.

The backbone loads with `attn_implementation=ATTENTION_NAME`, registered in transformers' public `AttentionInterface`.
The model is called on one packed stream of tokens (every row's new tokens, no padding) without a cache; each layer
computes the stream's keys and values as usual and hands them to `attend`, which stores them in the engine's KV pool
through the step's `StepKV` (passed down as the keyword argument `KV_KWARG`) and attends, row by row, over all the
row holds, through the step's `AttentionBackend`: `SDPA` here (each batch's keys gathered into padded tensors, with a
boolean mask: the reference), or FlexAttention over the pool in place (paged_flex.py). No transformers cache class is
used, subclassed or reached into.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from typing import Any, ClassVar, Protocol
from weakref import WeakKeyDictionary

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface, PreTrainedModel

logger = logging.getLogger(__name__)

ATTENTION_NAME = "promptserve"
KV_KWARG = "promptserve_kv"


class Routing(Enum):
    """How an encoder's attention can run (`attention_routing` probes it)."""

    POOL = "pool"  # every layer through `attend`, over the engine's pool: rows packed
    STOCK = "stock"  # through the AttentionInterface, but its layers carry no layer_idx (DistilBERT, ALBERT)
    OWN = "own"  # the model's own attention, outside the interface (DeBERTa-v2)


class WholeSequence:
    """The `KV_KWARG` of a pass over one whole sequence outside the pool (an encoder-decoder's encoder, one row at
    a time): attention as transformers computes it, with T5's position bias when there is one."""


WHOLE_SEQUENCE = WholeSequence()


class MissingEngineState(RuntimeError):
    """`attend` was called without the step's `StepKV`: outside the engine, or by a layer that drops its kwargs."""


class UnindexedAttention(RuntimeError):
    """An attention layer calls the AttentionInterface without a `layer_idx`: no pool layer to write."""


@dataclass(slots=True)
class RowBatch:
    """Rows attended together, padded to the widest of them: a step puts its decode rows (one new token each) in one
    and its prefill chunks in another, so a long chunk never pads every decode row to its width.

    Row r's keys are the pool slots `gather_slots[r, :key_lengths[r]]`, in position order (its task's shared prefix,
    then its own tokens), so a key's column is its position. Its new tokens are the stream's `query_index[r]`.
    """

    gather_slots: torch.Tensor  # [R, L]; padding reads slot 0, in block 0, which is never written: zeros
    key_lengths: torch.Tensor  # [R]
    query_index: torch.Tensor  # [R, T]; padding points at token 0
    query_positions: torch.Tensor  # [R, T]; padding has position 0: it sees one key, so no softmax row is empty
    output_index: torch.Tensor  # [n]: where the batch's real tokens sit in [R * T], in the order of stream_index
    stream_index: torch.Tensor  # [n]: those tokens' places in the stream
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by sliding window
    views: dict[object, Any] = field(default_factory=dict)  # what a backend builds from the rows once a step, by key
    causal: bool = True  # False: cross-attention, every key of the row is visible
    num_index: ClassVar[int] = 6  # index tensors (`index`)

    @classmethod
    def of(
        cls,
        key_slots: torch.Tensor,
        key_lengths: torch.Tensor,
        offsets: torch.Tensor,
        num_new: torch.Tensor,
        first_positions: torch.Tensor,
        causal: bool = True,
        num_keys: int | None = None,
        width: int | None = None,
    ) -> RowBatch:
        """Rows whose keys are `key_slots[r, :key_lengths[r]]` ([R, >= L]) and whose `num_new[r]` new tokens start
        at `offsets[r]` in the stream, at position `first_positions[r]` (`num_keys` and `width`: L and the most new
        tokens, when the caller knows them)."""
        device = key_slots.device
        column = torch.arange(int(key_lengths.max()) if num_keys is None else num_keys, device=device)[None]  # [1, L]
        gather_slots = torch.where(column < key_lengths[:, None], key_slots[:, : column.shape[1]], 0)
        width = int(num_new.max()) if width is None else width
        if width == 1:  # one new token a row (decode rows): every query is real, with no padding to point away
            return cls(gather_slots=gather_slots, key_lengths=key_lengths, query_index=offsets[:, None],
                       query_positions=first_positions[:, None], output_index=torch.arange(len(num_new), device=device),
                       stream_index=offsets, causal=causal)  # fmt: skip
        new = torch.arange(width, device=device)[None]  # [1, T]
        is_new = new < num_new[:, None]  # [R, T]
        return cls(
            gather_slots=gather_slots,
            key_lengths=key_lengths,
            query_index=torch.where(is_new, offsets[:, None] + new, 0),
            query_positions=torch.where(is_new, first_positions[:, None] + new, 0),
            output_index=(torch.arange(len(num_new), device=device)[:, None] * new.shape[1] + new)[is_new],
            stream_index=(offsets[:, None] + new)[is_new],
            causal=causal,
        )

    @classmethod
    def tiles(
        cls,
        key_slots: torch.Tensor,
        key_lengths: torch.Tensor,
        offsets: torch.Tensor,
        num_new: torch.Tensor,
        first_positions: torch.Tensor,
        limits: TileLimits,
        causal: bool = True,
    ) -> list[RowBatch]:
        """The rows of `of` as batches that each pad to at most `limits`: a row whose queries cannot all fit is cut
        into pieces of consecutive queries (a causal piece reads the keys up to its last query only), and the pieces
        are packed, longest keys first, into as few batches as the limits allow. One batch when the rows fit."""
        if limits.fits(len(num_new), int(num_new.max()), int(key_lengths.max())):
            return [cls.of(key_slots, key_lengths, offsets, num_new, first_positions, causal)]
        per_piece = torch.minimum((limits.pairs // key_lengths).clamp(min=1), num_new)  # [R]
        num_pieces = (num_new + per_piece - 1) // per_piece  # [R]
        row = torch.repeat_interleave(torch.arange(len(num_new), device=num_new.device), num_pieces)  # [P]
        first_piece = torch.repeat_interleave(num_pieces.cumsum(0) - num_pieces, num_pieces)
        first = (torch.arange(len(row), device=row.device) - first_piece) * per_piece[row]  # [P]: first new token
        count = torch.minimum(per_piece[row], num_new[row] - first)
        lengths = key_lengths[row] - (num_new[row] - first - count) if causal else key_lengths[row]
        order = torch.argsort(lengths, descending=True, stable=True)
        batches = []
        for part in order.split(packed_sizes(lengths[order].tolist(), count[order].tolist(), limits)):
            rows, starts = row[part], first[part]
            batches.append(cls.of(key_slots[rows], lengths[part], offsets[rows] + starts, count[part],
                                  first_positions[rows] + starts, causal))  # fmt: skip
        return batches

    def to(self, device: torch.device) -> RowBatch:
        return self.with_index([tensor.to(device) for tensor in self.index()])

    def index(self) -> list[torch.Tensor]:
        """Its index tensors, in the order `with_index` takes them."""
        return [self.gather_slots, self.key_lengths, self.query_index, self.query_positions, self.output_index,
                self.stream_index]  # fmt: skip

    def with_index(self, index: list[torch.Tensor]) -> RowBatch:
        """The same rows over these index tensors (`index`'s, copied elsewhere)."""
        gather_slots, key_lengths, query_index, query_positions, output_index, stream_index = index
        return RowBatch(gather_slots, key_lengths, query_index, query_positions, output_index, stream_index,
                        causal=self.causal)  # fmt: skip

    def gather(self, pool: torch.Tensor) -> torch.Tensor:
        rows, length = self.gather_slots.shape
        picked = pool.index_select(0, self.gather_slots.flatten())  # [R * L, kv_heads, head_dim]
        return picked.view(rows, length, *pool.shape[1:]).transpose(1, 2)  # [R, kv_heads, L, head_dim]

    def queries(self, query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """[1, heads, N, d] -> [R, kv_heads, group * T, d]: each KV head's query heads stacked as rows, so
        attention runs per KV head without repeating keys (grouped-query attention)."""
        rows, width = self.query_index.shape
        _, heads, _, head_dim = query.shape
        picked = query[0].transpose(0, 1).index_select(0, self.query_index.flatten())  # [R * T, heads, d]
        grouped = picked.view(rows, width, num_kv_heads, heads // num_kv_heads, head_dim)
        return grouped.permute(0, 2, 3, 1, 4).reshape(rows, num_kv_heads, -1, head_dim)

    def outputs(self, output: torch.Tensor, heads: int) -> torch.Tensor:
        """[R, kv_heads, group * T, d] -> [n, heads, d], the batch's real tokens."""
        rows, num_kv_heads, _, head_dim = output.shape
        width = self.query_index.shape[1]
        grouped = output.view(rows, num_kv_heads, heads // num_kv_heads, width, head_dim)
        flat = grouped.permute(0, 3, 1, 2, 4).reshape(rows * width, heads, head_dim)
        return flat.index_select(0, self.output_index)

    def mask(self, sliding_window: int | None, group: int) -> torch.Tensor:
        """[R, 1, group * T, L] bool (as `queries` stacks them): a query sees its row's keys at or before its
        position (within the window)."""
        if sliding_window not in self.masks:
            mask = self.build_mask(sliding_window)
            self.masks[sliding_window] = mask if mask.shape[2] == 1 else mask.repeat(1, 1, group, 1)
        return self.masks[sliding_window]

    def build_mask(self, sliding_window: int | None) -> torch.Tensor:
        """[R, 1, T or 1, L] bool, from comparisons alone (no [R, T, L] distance tensor of int64)."""
        columns = torch.arange(self.gather_slots.shape[1], device=self.gather_slots.device)  # [L]
        allowed = (columns < self.key_lengths[:, None])[:, None]  # [R, 1, L]
        positions = self.query_positions[:, :, None]  # [R, T, 1]
        if self.causal:
            allowed = allowed & (columns <= positions)  # [R, T, L]
        if sliding_window is not None:
            allowed = allowed & (columns > positions - sliding_window)
        return allowed[:, None]


@dataclass(frozen=True, slots=True)
class TileLimits:
    """The most one attention call pads its rows to: query-key pairs (rows x queries x keys, what its mask and its
    scores hold per head) and gathered key slots (rows x keys, what it copies out of the pool per layer). They bound
    a step's attention temporaries whatever its rows, so the start-up memory profile sees the real peak."""

    pairs: int
    keys: int

    def fits(self, rows: int, queries: int, keys: int) -> bool:
        return rows * queries * keys <= self.pairs and rows * keys <= self.keys


UNBOUNDED = TileLimits(pairs=2**62, keys=2**62)


def packed_sizes(lengths: list[int], counts: list[int], limits: TileLimits) -> list[int]:
    """Pieces in order of decreasing key length, cut into consecutive batches within the limits (a piece alone
    always makes a batch): the size of each."""
    sizes: list[int] = []
    start, width = 0, 0
    for i, count in enumerate(counts):
        if i > start and not limits.fits(i - start + 1, max(width, count), lengths[start]):
            sizes.append(i - start)
            start, width = i, 0
        width = max(width, count)
    return [*sizes, len(counts) - start]


@dataclass(frozen=True, slots=True)
class Scoring:
    """How a layer turns a query-key product into a logit: its scale (None: 1/sqrt(head_dim)), a sliding window
    (None: every key at or before the query), an additive bias at the positions, a softcap (tanh, before the bias)."""

    scaling: float | None = None
    sliding_window: int | None = None
    bias: Bias | None = None
    softcap: float | None = None


class AttentionBackend(Protocol):
    """How a layer's queries attend over the rows' keys and values in the pool, batch by batch."""

    name: str

    def attend(
        self, query: torch.Tensor, num_kv_heads: int, keys: torch.Tensor, values: torch.Tensor,
        batches: list[RowBatch], scoring: Scoring,
    ) -> tuple[torch.Tensor, None]:  # fmt: skip
        """query [1, heads, N, head_dim] (the packed stream), the pool's keys and values [num_slots, kv_heads,
        head_dim]; returns [1, N, heads, head_dim]."""
        ...


@dataclass(slots=True)
class StepKV:
    """One forward pass over the packed token stream: where its new keys and values go, and its row batches."""

    keys: list[torch.Tensor]  # the pool's, per layer [num_slots, kv_heads, head_dim]
    values: list[torch.Tensor]
    write_slots: torch.Tensor  # [N]
    batches: list[RowBatch]
    num_layers_written: int = 0
    cross: CrossKV | None = None  # an encoder-decoder's step
    relative_bias: Bias | None = None  # T5's, for decoder self-attention
    backend: AttentionBackend = field(default_factory=lambda: SDPA)

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store the stream's keys and values [1, kv_heads, N, head_dim] in the pool."""
        self.keys[layer].index_copy_(0, self.write_slots, key[0].transpose(0, 1))
        self.values[layer].index_copy_(0, self.write_slots, value[0].transpose(0, 1))
        self.num_layers_written += 1


@dataclass(slots=True)
class CrossKV:
    """An encoder-decoder step's cross-attention: pool layers `first_layer + l` hold each row's encoder keys and
    values in the row's own slots; the step writes those of the rows it starts (`write_slots`, in the order of the
    encoder outputs handed to the model) and attends every row over its own. `modules`: the decoder's
    cross-attention modules (its other attention modules are its self-attention)."""

    first_layer: int
    write_slots: torch.Tensor  # [S_new]
    batches: list[RowBatch]
    modules: frozenset[torch.nn.Module]


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
    """An `AttentionInterface` function: query [1, heads, N, head_dim] (the packed stream); returns [1, N, heads, d]."""
    kv = kwargs.get(KV_KWARG)
    if isinstance(kv, WholeSequence):
        return whole_sequence_attention(query, key, value, attention_mask, scaling, kwargs.get("position_bias"))
    if not isinstance(kv, StepKV):
        raise MissingEngineState(
            f"attention {ATTENTION_NAME!r} runs only inside the promptserve engine (no {KV_KWARG})"
        )
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            "its attention uses attention sinks (s_aux), which the engine's attention does not compute"
        )
    layer: int | None = getattr(module, "layer_idx", None)
    if layer is None:
        raise UnindexedAttention(f"{type(module).__name__} calls {ATTENTION_NAME!r} without a layer_idx")
    if kv.cross is not None and module in kv.cross.modules:
        return cross_attention(layer, query, key, value, kv, kv.cross, scaling)
    kv.write(layer, key, value)
    scoring = Scoring(scaling, kwargs.get("sliding_window"), kv.relative_bias, kwargs.get("softcap"))
    return kv.backend.attend(query, key.shape[1], kv.keys[layer], kv.values[layer], kv.batches, scoring)


def attend_batches(
    query: torch.Tensor,
    num_kv_heads: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    batches: list[RowBatch],
    scoring: Scoring,
) -> tuple[torch.Tensor, None]:
    """Each batch of rows over its keys and values in the pool; returns [1, N, heads, head_dim]."""
    _, heads, num_tokens, head_dim = query.shape
    group = heads // num_kv_heads
    output = query.new_empty((num_tokens, heads, head_dim))
    softcap = scoring.softcap
    attention = scaled_dot_product_attention if softcap is None else partial(softcapped_attention, softcap=softcap)
    for batch in batches:
        mask = batch.mask(scoring.sliding_window, group)
        if scoring.bias is not None:
            mask = biased_mask(scoring.bias, batch, mask, num_kv_heads).to(query.dtype)
        attended = attention(
            batch.queries(query, num_kv_heads),
            batch.gather(keys),
            batch.gather(values),
            attn_mask=mask,
            scale=scoring.scaling,
        )  # [R, kv_heads, group * T, head_dim]
        output.index_copy_(0, batch.stream_index, batch.outputs(attended, heads))
    return output[None], None


class Sdpa:
    """The reference backend: each batch's keys and values gathered into padded tensors, a boolean mask, SDPA."""

    name = "sdpa"

    def attend(self, *args: Any) -> tuple[torch.Tensor, None]:
        return attend_batches(*args)  # the module's function, looked up at the call (tests watch it)


SDPA: AttentionBackend = Sdpa()


class Bias(Protocol):
    """A per-head additive bias on the attention logits at the rows' positions (T5's relative bias, ALiBi)."""

    def __call__(self, query_positions: torch.Tensor, num_keys: int) -> torch.Tensor:
        """query_positions [R, T] -> [R or 1, heads, T or 1, num_keys] (key column = key position)."""
        ...

    def at(self, head: torch.Tensor, query_position: torch.Tensor, key_position: torch.Tensor) -> torch.Tensor:
        """The same bias, elementwise over broadcastable head, query and key positions (a FlexAttention score_mod
        calls it with scalars)."""
        ...


def biased_mask(bias: Bias, batch: RowBatch, mask: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The bias as an additive mask [R, kv_heads, group * T, L], in the layout `RowBatch.queries` stacks heads in,
    -inf where the boolean mask [R, 1, group * T or 1, L] hides a key."""
    rows, width = batch.query_index.shape
    length = batch.gather_slots.shape[1]
    per_head = bias(batch.query_positions, length)
    heads = per_head.shape[1]
    grouped = per_head.expand(rows, heads, width, length).reshape(rows, num_kv_heads, -1, length)
    return grouped.float().masked_fill(~mask, float("-inf"))


def softcapped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor,
    scale: float | None,
    softcap: float,
) -> torch.Tensor:
    """Attention with its logits capped at +-softcap by tanh before the mask (Gemma-2), as its eager attention
    computes it: query [R, h, Tq, d], key and value [R, h, L, d], a boolean (or additive) mask [R, 1|h, Tq, L]."""
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # [R, h, Tq, L]
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value)


def cross_attention(
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv: StepKV,
    cross: CrossKV,
    scaling: float | None,
) -> tuple[torch.Tensor, None]:
    """Store the starting rows' encoder keys and values (key/value are those of the encoder outputs the step
    handed the model), then attend every row over its own."""
    pool_layer = cross.first_layer + layer
    if cross.write_slots.numel():
        kv.keys[pool_layer].index_copy_(0, cross.write_slots, key[0].transpose(0, 1))
        kv.values[pool_layer].index_copy_(0, cross.write_slots, value[0].transpose(0, 1))
    kv.num_layers_written += 1
    keys, values = kv.keys[pool_layer], kv.values[pool_layer]
    return kv.backend.attend(query, key.shape[1], keys, values, cross.batches, Scoring(scaling))


def whole_sequence_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    position_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, None]:
    """Bidirectional attention over one sequence, with T5's position bias when there is one."""
    mask = position_bias
    if attention_mask is not None:
        mask = attention_mask if mask is None else mask + attention_mask
    output = scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, attend)


def run_backbone(
    model: PreTrainedModel, kv: StepKV, hidden_index: torch.Tensor | None = None, **inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward pass of the packed stream [1, N] over the pool, without a transformers cache: the logits the
    inputs' `logits_to_keep` asks for, [K, V] in float32, and the final hidden states [M, H] of the tokens at
    `hidden_index` (read off the base model's output, as transformers' classification heads read it)."""
    captured: list[torch.Tensor] = []
    hook = None
    if hidden_index is not None and hidden_index.numel():
        hook = model.base_model.register_forward_hook(lambda _m, _a, out: captured.append(out[0][0, hidden_index]))
    try:
        logits = model(**inputs, use_cache=False, **{KV_KWARG: kv}).logits
    finally:
        if hook is not None:
            hook.remove()
    check_layers(model, kv)
    return logits[0].float(), captured[0] if captured else None


def run_encoder(model: torch.nn.Module, kv: StepKV, **inputs: torch.Tensor) -> torch.Tensor:
    """An encoder's pass over the packed stream [1, N] (bidirectional within each row): hidden states [N, H]."""
    hidden = model(**inputs, use_cache=False, **{KV_KWARG: kv})[0]
    check_layers(model, kv)
    return hidden[0]


def check_layers(model: torch.nn.Module, kv: StepKV) -> None:
    expected = num_layers(model)
    if kv.num_layers_written != expected:
        raise RuntimeError(
            f"{type(model).__name__}: {kv.num_layers_written} of {expected} layers ran their attention through "
            f"the {ATTENTION_NAME!r} AttentionInterface function; promptserve serves only models whose every "
            "attention layer does"
        )


@torch.inference_mode()
def attention_routing(encoder: torch.nn.Module) -> Routing:
    """How this encoder's attention can run: one two-token pass through the AttentionInterface function."""
    kv = scratch_kv(encoder, num_layers(encoder))
    kv.batches[0].causal = False
    try:
        encoder(input_ids=torch.zeros(1, 2, dtype=torch.long, device=kv.write_slots.device), **{KV_KWARG: kv})
    except UnindexedAttention:
        return Routing.STOCK
    except Exception as error:  # whatever the model raised, its attention is not ours to run
        logger.info("%s attends on its own (%s: %s)", type(encoder).__name__, type(error).__name__, error)
        return Routing.OWN
    return Routing.POOL if kv.num_layers_written == num_layers(encoder) else Routing.OWN


@torch.inference_mode()
def unrouted_attention(model: torch.nn.Module, kv_heads: int | None = None) -> str | None:
    """Why a causal LM's attention does not all run through `attend` (None: it does), from one two-token pass
    (`kv_heads`: the key-value heads its layers attend with, where its config does not say)."""
    try:
        kv = scratch_kv(model, num_layers(model), kv_heads)
    except Exception as error:  # e.g. Gemma-4's per-layer head sizes: no one shape for the pool's layers
        logger.debug("%s: no one attention shape", type(model).__name__, exc_info=error)
        return "its configuration does not give every layer one attention shape (heads, head size)"
    try:
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=kv.write_slots.device), use_cache=False,
              **{KV_KWARG: kv})  # fmt: skip
    except UnindexedAttention:
        return "its attention layers carry no layer index"
    except MissingEngineState:
        return "its decoder layers do not pass their keyword arguments on to their attention"
    except NotImplementedError as error:
        return str(error)
    except Exception as error:  # whatever the model raised, its attention is not ours to run
        logger.debug("%s: the attention probe raised", type(model).__name__, exc_info=error)
        return "its forward fails in its own code when its attention is a custom AttentionInterface function"
    if kv.num_layers_written == 0:
        return "its attention does not go through transformers' AttentionInterface (it computes its own)"
    if kv.num_layers_written != num_layers(model):
        return f"{kv.num_layers_written} of {num_layers(model)} layers attend through transformers' AttentionInterface"
    return None


LAYER_COUNTS: WeakKeyDictionary[torch.nn.Module, int] = WeakKeyDictionary()  # by model: every step checks it


def num_layers(model: torch.nn.Module) -> int:
    """The model's layers, read from its config once (transformers 5's config attributes take several µs each)."""
    count = LAYER_COUNTS.get(model)
    if count is None:
        count = LAYER_COUNTS[model] = int(model.config.get_text_config().num_hidden_layers)  # type: ignore[operator,union-attr]
    return count


def scratch_kv(model: torch.nn.Module, layers: int, kv_heads: int | None = None) -> StepKV:
    """One two-token row over a scratch pool of `layers` layers (slot 0 is the padding slot), on the model's device
    and in its dtype, laid out as the pool is (the key-value heads and head size of the config, or `kv_heads`)."""
    config = model.config.get_text_config()  # type: ignore[operator,union-attr]
    query_heads = config.num_attention_heads
    heads = kv_heads or getattr(config, "num_key_value_heads", None) or query_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // query_heads
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    scratch = [torch.zeros(3, heads, head_dim, device=device, dtype=dtype) for _ in range(layers)]
    return one_row_kv(scratch, [t.clone() for t in scratch], torch.arange(1, 3, device=device))


def run_decoder(model: PreTrainedModel, kv: StepKV, num_layers: int, **inputs: Any) -> torch.Tensor:
    """An encoder-decoder's decoder pass over the packed stream (`decoder_input_ids` [1, N], `encoder_outputs`):
    every position's logits [N, V] in float32 (these models compute them all)."""
    logits = model(**inputs, use_cache=False, **{KV_KWARG: kv}).logits
    if kv.num_layers_written != 2 * num_layers:
        raise RuntimeError(
            f"{type(model).__name__}: {kv.num_layers_written} of {2 * num_layers} decoder attentions ran through the "
            f"{ATTENTION_NAME!r} AttentionInterface function; promptserve serves only models whose every one does"
        )
    return logits[0].float()


def one_row_kv(keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor) -> StepKV:
    """A pass of one row whose every token is new: `slots` [T] are its tokens' slots, positions 0..T-1."""
    zero = torch.zeros(1, dtype=torch.long, device=slots.device)
    num_new = torch.tensor([slots.shape[0]], device=slots.device)
    batch = RowBatch.of(slots[None], num_new, zero, num_new, zero)
    return StepKV(keys, values, write_slots=slots, batches=[batch])
