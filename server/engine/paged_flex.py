"""FlexAttention over the KV pool in place: no per-layer gather of keys into padded tensors, no dense mask.

Each row of a `RowBatch` is one batch entry of `flex_attention`, its queries padded to the batch's width; the keys
and values are the pool's own tensors, viewed as one sequence of slots. A `BlockMask` lists the pool blocks each row
reads (from the step's `gather_slots`), so the kernel visits those and no others (causally, only up to each query
block's last position); a `mask_mod` decides each slot from tables of the step: the position of the slot's block
(`block_start`, shared by every reader: a task's prefix blocks sit at the same positions in each of its rows) and
the row's own slot at that position (`gather_slots`), so a slot is the row's key exactly when the two agree. Softcaps
(Gemma-2), ALiBi (Bloom, Falcon, MPT) and T5's relative bias are a `score_mod`; sliding windows join the mask.

On CUDA the kernel is `torch.compile`d (Triton); on the CPU it runs uncompiled, which materialises every row's
scores over the whole pool: there it checks the backend against SDPA and is not for serving (docs/performance.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from inspect import signature
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from server.engine.attention import SDPA, AttentionBackend, Bias, RowBatch, Scoring
from server.engine.config import SettingError

logger = logging.getLogger(__name__)

BACKENDS = ("sdpa", "flex")
Q_BLOCK = 16  # queries per block of the mask: a decode row has one, a prefill chunk a few blocks
MIN_CUDA_KV_BLOCK = 16  # Triton's smallest dot tile: the kernel's key block is the pool's block
# the backward pass's index, which inference does not need: not built, where this torch lets it be skipped
SKIPS_Q_BLOCKS = "compute_q_blocks" in signature(BlockMask.from_kv_blocks).parameters
NO_Q_BLOCKS: dict[str, Any] = {"compute_q_blocks": False} if SKIPS_Q_BLOCKS else {}


@dataclass(frozen=True, slots=True)
class PagedRows:
    """A RowBatch's tables for FlexAttention, built once a step: the slot tables the mask reads and the blocks
    each row's query blocks visit."""

    block_start: torch.Tensor  # [num_blocks]: position of a block's first slot for any row reading it
    kv_num_blocks: torch.Tensor  # [R, 1, Q blocks] int32
    kv_indices: torch.Tensor  # [R, 1, Q blocks, W] int32: the blocks each row reads, in position order

    def block_mask(self, batch: RowBatch, block_size: int, sliding_window: int | None) -> BlockMask:
        width = batch.query_index.shape[1]
        return BlockMask.from_kv_blocks(
            self.kv_num_blocks,
            self.kv_indices,
            *self.no_full_blocks(),
            BLOCK_SIZE=(Q_BLOCK, block_size),
            mask_mod=row_keys(batch, self.block_start, block_size, sliding_window),
            seq_lengths=(width, len(self.block_start) * block_size),
            **NO_Q_BLOCKS,
        )

    def no_full_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """No block is marked wholly visible (which would skip the mask for a row's interior blocks; not done yet):
        said with empty tables, which the compiled CPU kernel needs (it fails to build without them)."""
        return torch.zeros_like(self.kv_num_blocks), torch.zeros_like(self.kv_indices)


def paged_rows(batch: RowBatch, block_size: int, num_blocks: int, full_width: bool) -> PagedRows:
    """The tables of `PagedRows` from the batch's slots, with tensor operations on its device (`full_width`: the
    block index as wide as the pool, which the compiled CPU kernel asks for)."""
    slots = batch.gather_slots  # [R, L]
    rows, length = slots.shape
    column = torch.arange(length, device=slots.device)[None]  # [1, L]
    is_key = column < batch.key_lengths[:, None]  # [R, L]
    blocks = slots // block_size
    starts = column - slots % block_size  # [R, L]: the position of each key's block's first slot
    block_start = torch.zeros(num_blocks, dtype=torch.long, device=slots.device)
    block_start[blocks[is_key]] = starts[is_key]  # every reader writes the same position
    is_first = is_key & ((column == 0) | (blocks != blocks.roll(1, dims=1)))  # [R, L]: a block's first key
    width = num_blocks if full_width else length // block_size + 2  # a row's blocks: at most this many
    place = torch.where(is_first, is_first.cumsum(1) - 1, width)  # [R, L]; the rest to a spare column
    indices = torch.zeros(rows, width + 1, dtype=torch.long, device=slots.device)
    indices.scatter_(1, place, blocks)
    first_starts = torch.full((rows, width + 1), torch.iinfo(torch.long).max, device=slots.device)
    first_starts.scatter_(1, place, starts)
    reach = last_query_positions(batch)  # [R, Q blocks]: the last position each query block reaches
    visited = first_starts[:, None, :width] <= reach[:, :, None]  # [R, Q blocks, W]
    return PagedRows(
        block_start=block_start,
        kv_num_blocks=visited.sum(-1, dtype=torch.int32)[:, None],
        kv_indices=indices[:, None, None, :width].expand(-1, -1, reach.shape[1], -1).to(torch.int32).contiguous(),
    )


def last_query_positions(batch: RowBatch) -> torch.Tensor:
    """[R, Q blocks]: the furthest key position each block of a row's queries may see (a row's last key where its
    queries see all of them)."""
    rows, width = batch.query_positions.shape
    num_q_blocks = -(-width // Q_BLOCK)
    if not batch.causal:
        return (batch.key_lengths - 1)[:, None].expand(rows, num_q_blocks)
    padded = torch.nn.functional.pad(batch.query_positions, (0, num_q_blocks * Q_BLOCK - width))
    return padded.view(rows, num_q_blocks, Q_BLOCK).amax(-1)


MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def row_keys(batch: RowBatch, block_start: torch.Tensor, block_size: int, sliding_window: int | None) -> MaskMod:
    """The mask: slot `kv` is a key of row `b` for its query `q` (at or before the query's position, within the
    window, for a causal batch)."""
    slots, key_lengths, query_positions = batch.gather_slots, batch.key_lengths, batch.query_positions
    last_column = slots.shape[1] - 1
    causal = batch.causal

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        position = slot_position(block_start, block_size, kv)
        seen = (position < key_lengths[b]) & (slots[b, position.clamp(0, last_column)] == kv)
        if causal:
            seen = seen & (position <= query_positions[b, q])
        if sliding_window is not None:
            seen = seen & (position > query_positions[b, q] - sliding_window)
        return seen

    return mask_mod


def slot_position(block_start: torch.Tensor, block_size: int, slot: torch.Tensor) -> torch.Tensor:
    """The position a pool slot holds for the rows reading its block."""
    return block_start[slot // block_size] + slot % block_size


def score_mod_of(
    batch: RowBatch, block_start: torch.Tensor, block_size: int, bias: Bias | None, softcap: float | None
) -> ScoreMod | None:
    """The scores' softcap (tanh, before any bias, as the eager attention of Gemma-2 caps them) and bias at the
    row's positions (the key's position read from its slot as the mask reads it). None: the scores as they are."""
    if bias is None and softcap is None:
        return None
    query_positions = batch.query_positions

    def score_mod(
        score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        if softcap is not None:
            score = torch.tanh(score / softcap) * softcap
        if bias is not None:
            position = slot_position(block_start, block_size, kv)
            score = score + bias.at(h, query_positions[b, q], position)
        return score

    return score_mod


class FlexBackend:
    """FlexAttention over the pool in place (see the module). `compiled`: through `torch.compile` (on CUDA; the
    CPU compiles it too, once per new shape)."""

    name = "flex"

    def __init__(self, block_size: int, compiled: bool) -> None:
        self.block_size = block_size
        self.compiled = compiled
        self.kernel: Callable[..., Any] = torch.compile(flex_attention) if compiled else flex_attention  # type: ignore[assignment]

    @torch.inference_mode()  # a bias table is a parameter: no backward pass is asked for
    def attend(
        self, query: torch.Tensor, num_kv_heads: int, keys: torch.Tensor, values: torch.Tensor,
        batches: list[RowBatch], scoring: Scoring,
    ) -> tuple[torch.Tensor, None]:  # fmt: skip
        """Each batch of rows over the pool's keys and values as they lie; returns [1, N, heads, head_dim]."""
        _, heads, num_tokens, head_dim = query.shape
        output = query.new_empty((num_tokens, heads, head_dim))
        pool_keys, pool_values = keys.permute(1, 0, 2)[None], values.permute(1, 0, 2)[None]  # [1, kv_heads, S, d]
        for batch in batches:
            rows = self.paged_rows(batch, len(keys) // self.block_size)
            attended = self.kernel(
                batch_queries(batch, query),
                pool_keys,
                pool_values,
                score_mod=score_mod_of(batch, rows.block_start, self.block_size, scoring.bias, scoring.softcap),
                block_mask=self.block_mask(batch, rows, scoring.sliding_window),
                scale=scoring.scaling,
                enable_gqa=heads != num_kv_heads,
                kernel_options=self.kernel_options(query),
            )  # [R, heads, T, d]
            output.index_copy_(0, batch.stream_index, batch_outputs(batch, attended))
        return output[None], None

    def paged_rows(self, batch: RowBatch, num_blocks: int) -> PagedRows:
        """The batch's tables, built at the step's first layer."""
        if self.name not in batch.views:
            full_width = self.compiled and batch.gather_slots.device.type == "cpu"
            batch.views[self.name] = paged_rows(batch, self.block_size, num_blocks, full_width)
        rows: PagedRows = batch.views[self.name]
        return rows

    def block_mask(self, batch: RowBatch, rows: PagedRows, sliding_window: int | None) -> BlockMask:
        """The batch's mask for this window (a model may mix windowed and global layers), built once a step."""
        key = (self.name, sliding_window)
        if key not in batch.views:
            batch.views[key] = rows.block_mask(batch, self.block_size, sliding_window)
        mask: BlockMask = batch.views[key]
        return mask

    def kernel_options(self, query: torch.Tensor) -> dict[str, Any] | None:
        """On CUDA: the kernel's tiles are the mask's blocks (the key block is the pool's), and the main kernel for
        decode rows too (its decoding kernel expects one block list per key-value head group), as vLLM does."""
        if query.device.type != "cuda":
            return None
        return {"FORCE_USE_FLEX_ATTENTION": True, "BLOCK_M": Q_BLOCK, "BLOCK_N": self.block_size}


def batch_queries(batch: RowBatch, query: torch.Tensor) -> torch.Tensor:
    """[1, heads, N, d] -> [R, heads, T, d]: each row's new tokens, padded to the batch's width."""
    rows, width = batch.query_index.shape
    picked = query[0].index_select(1, batch.query_index.flatten())  # [heads, R * T, d]
    return picked.unflatten(1, (rows, width)).transpose(0, 1)


def batch_outputs(batch: RowBatch, attended: torch.Tensor) -> torch.Tensor:
    """[R, heads, T, d] -> [n, heads, d], the batch's real tokens in the order of its stream_index."""
    return attended.transpose(1, 2).flatten(0, 1).index_select(0, batch.output_index)


def attention_backend(name: str, device: torch.device, block_size: int) -> AttentionBackend:
    """The backend a setting names, for this device: flex is compiled on CUDA (and wants the pool's blocks at least
    one Triton tile wide), uncompiled on the CPU (where it only checks against SDPA: logged)."""
    if name == "sdpa":
        return SDPA
    if name != "flex":
        raise SettingError("attention_backend", f"one of {', '.join(BACKENDS)}", repr(name))
    if device.type == "cuda":
        if block_size % MIN_CUDA_KV_BLOCK:
            raise SettingError(
                "kv_block_size",
                f"a multiple of {MIN_CUDA_KV_BLOCK} with attention_backend flex on CUDA (the kernel's key blocks)",
                str(block_size),
            )
        return FlexBackend(block_size, compiled=True)
    logger.warning(
        "attention_backend flex on %s runs FlexAttention uncompiled, over every slot of the pool: for checking it "
        "against sdpa, slower than sdpa (docs/performance.md)",
        device.type,
    )
    return FlexBackend(block_size, compiled=False)
