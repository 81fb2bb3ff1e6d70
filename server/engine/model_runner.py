"""Builds the step's tensors in one place and runs the frozen backbone over one packed stream of tokens.

A step's chunks (a decode token, or a piece of a prefill) become one stream [1, N], rows one after another with no
padding, with each token's position. Three kinds of rows share it:
- plain rows: embed(x) on the bare backbone
- rows whose task is held as keys and values (prefix tasks, and by default prompt tasks): the row's keys start with
  the task's shared blocks, and its own positions continue after them
- prompt rows fed as embeddings: the task's vectors are the row's first own tokens

The pass itself is the backbone kind's (server/engine/kinds/): a causal LM's runs the stream causally; an encoder's
(BERT, RoBERTa) runs it with each row whole and attending both ways (or padded into one batch where its attention
cannot use the pool); an encoder-decoder's runs its encoder for each row the step starts, then the decoder over the
stream. The step returns the logits and the final hidden states of the stream positions its `Readout` names.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

import torch

from prompt_store.types import TaskKey
from server.engine.adapters import DeviceAdapter
from server.engine.attention import SDPA, UNBOUNDED, AttentionBackend, RowBatch, StepKV, TileLimits
from server.engine.backbone import Backbone
from server.engine.kinds.base import StepResult
from server.engine.kv_pool import HOST, KVPool, long_tensor, to_device
from server.engine.readout import Readout
from server.engine.request import Sequence
from server.engine.scheduler import Chunk
from server.engine.slot_table import SlotTable
from server.engine.task_cache import TaskCache

Prompts = dict[TaskKey, torch.Tensor]  # a step's prompt vectors [P, H], by task version, loaded before the pass


class ModelRunner:
    """The step's tensors and the pass through the model, which the backbone's kind (`kind.forward`) builds from the
    pieces here."""

    def __init__(
        self,
        backbone: Backbone,
        pool: KVPool,
        tasks: TaskCache,
        limits: TileLimits = UNBOUNDED,
        attention: AttentionBackend = SDPA,
    ) -> None:
        """`limits`: the most one attention call pads to (what the start-up memory profile measured); `attention`:
        how the layers attend over the pool."""
        self.backbone = backbone
        self.model = backbone.model
        self.device = backbone.device
        self.pool = pool
        self.tasks = tasks
        self.limits = limits
        self.attention = attention
        self.embed_tokens = backbone.model.get_input_embeddings()
        self.prompts: Prompts = {}  # the current step's
        self.slots = SlotTable(pool.block_size)  # the running rows' key slots, kept from step to step

    def prompt_rows(self, chunks: list[Chunk]) -> list[Sequence]:
        """The rows whose prompt task's vectors this step feeds as input embeddings (an encoder-decoder's: to its
        encoder, in the step that starts the row)."""
        return self.backbone.kind.prompt_rows(chunks)

    def load_prompts(self, chunks: list[Chunk]) -> Prompts:
        return {row.task.key: self.tasks.embeddings_of(row.task) for row in self.prompt_rows(chunks) if row.task}

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], readout: Readout, prompts: Prompts | None = None) -> StepResult:
        """Compute every chunk in one pass: the logits [K, V] and hidden states [M, H] the readout asks for.
        `prompts`: the vectors of the rows' prompt tasks fed as embeddings (None: loaded here)."""
        self.prompts = self.load_prompts(chunks) if prompts is None else prompts
        try:
            with self.adapted([chunk.row for chunk in chunks], [chunk.num_tokens for chunk in chunks]):
                return self.backbone.kind.forward(self, chunks, readout)
        finally:
            self.prompts = {}  # a retired task's vectors are not kept past its last step

    def adapted(
        self, rows: list[Sequence | None], lengths: list[int], width: int | None = None
    ) -> AbstractContextManager[None]:
        """For the model calls inside: rows laid one after another in the flattened tokens (row i: lengths[i] of
        them; a None row: padding; `width`: a padded batch's), each LoRA / IA3 row's tokens with its task's deltas."""
        return self.tasks.adapters.hooks.tokens(self.row_adapters(rows), lengths, self.device, width)

    def row_adapters(self, rows: list[Sequence | None]) -> list[DeviceAdapter | None]:
        return [self.adapter_of(row) if row is not None and row.holds_adapter else None for row in rows]

    def adapter_of(self, row: Sequence | None) -> DeviceAdapter | None:
        if row is None or not row.holds_adapter or row.task is None:
            return None
        adapter = self.tasks.adapters.get(row.task.key)
        assert adapter is not None, "a running row's LoRA / IA3 task is in the adapter pool (loaded when it started)"
        return adapter

    def index(self, positions: list[int]) -> torch.Tensor:
        """Stream positions (a readout's) as an index on the device, in a copy of their own: for a pass outside the
        pool (`stream` takes a step's in its one copy)."""
        return long_tensor(positions).to(self.device)

    def stream(
        self, chunks: list[Chunk], causal: bool = True, extra: tuple[torch.Tensor, ...] = ()
    ) -> tuple[StreamLayout, StepKV, list[torch.Tensor]]:
        """The packed stream's layout, and the pass's state over the pool (`causal` False: each row's tokens see
        all of its keys); `extra`, the kind's other host int64 tensors of the step (its tokens' ids, the positions
        read out), come back on the device: all of them reach it in one copy, which does not block the host."""
        layout = StreamLayout.of(chunks, self.slots, causal, self.limits)
        host = [layout.positions, layout.write_slots, *(t for batch in layout.batches for t in batch.index())]
        positions, write_slots, *index = to_device([*host, *extra], self.device)  # one copy to the device a step
        index, on_device = index[: len(index) - len(extra)], index[len(index) - len(extra) :]
        width = RowBatch.num_index
        batches = [batch.with_index(index[i * width : (i + 1) * width]) for i, batch in enumerate(layout.batches)]
        kv = StepKV(self.pool.keys, self.pool.values, write_slots=write_slots, batches=batches, backend=self.attention)
        return replace(layout, positions=positions, write_slots=write_slots, batches=batches), kv, on_device

    def row_embeds(self, row: Sequence) -> torch.Tensor:
        """[T, H]: a row's own tokens embedded, a prompt task's vectors first."""
        ids = own_token_ids(row, 0, row.num_own_tokens)
        embeds = self.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.device))
        if row.num_embedded_tokens and row.task is not None:
            embeds[: row.num_embedded_tokens] = self.prompts[row.task.key].to(embeds.dtype)
        return embeds

    def stream_tokens(self, chunks: list[Chunk]) -> tuple[torch.Tensor, list[tuple[Chunk, int]]]:
        """The stream's token ids [N] on the host, and (chunk, offset) of the chunks with vectors of their own to
        place over theirs (`input_embeds`): a prompt task's, or given embeddings."""
        token_ids: list[int] = []
        placed = []
        for chunk in chunks:
            row = chunk.row
            if chunk.num_tokens == 1 and row.output_ids and chunk.is_last:
                # a decoding row: every kind's own tokens end with the output, past the prompt task's vectors and
                # the given input embeddings, so its token is its last output and it has no vectors to place
                token_ids.append(row.output_ids[-1])
                continue
            if chunk.start < row.num_embedded_tokens or row.request.input_embeds is not None:
                placed.append((chunk, len(token_ids)))
            token_ids += own_token_ids(row, chunk.start, chunk.num_tokens)
        return long_tensor(token_ids), placed

    def input_embeds(self, token_ids: torch.Tensor, placed: list[tuple[Chunk, int]]) -> torch.Tensor:
        """[N, H]: the stream's tokens (`stream_tokens`' ids, on the device) embedded; an embedded-prompt row's
        virtual tokens from its task, a row given embeddings its own."""
        embeds = self.embed_tokens(token_ids)
        for chunk, offset in placed:
            row, end = chunk.row, min(chunk.start + chunk.num_tokens, chunk.row.num_embedded_tokens)
            if chunk.start < end and row.task is not None:
                prompt = self.prompts[row.task.key]  # [P, H]
                embeds[offset : offset + end - chunk.start] = prompt[chunk.start : end].to(embeds.dtype)
            if row.request.input_embeds is not None:
                place_given_embeds(embeds, chunk, offset)
        return embeds


def place_given_embeds(embeds: torch.Tensor, chunk: Chunk, offset: int) -> None:
    """A row whose input came as embeddings (vLLM's prompt_embeds): its input positions, after any embedded
    virtual tokens, take them in place of the placeholder ids' embeddings. embeds [N, H], the chunk's at offset."""
    row, given = chunk.row, chunk.row.request.input_embeds
    assert given is not None
    first = max(chunk.start, row.num_embedded_tokens)  # own token indices
    last = min(chunk.start + chunk.num_tokens, row.num_embedded_tokens + len(given))
    if first < last:
        rows = given[first - row.num_embedded_tokens : last - row.num_embedded_tokens]  # [last - first, H]
        embeds[offset + first - chunk.start : offset + last - chunk.start] = rows.to(embeds.dtype)


@dataclass(frozen=True, slots=True)
class StreamLayout:
    """Where every token of a step's packed stream lives: built on the host with a few tensor operations, whatever
    the rows (their key slots read from the runner's `SlotTable`, kept from step to step), and copied to the
    engine's device.

    Row b computes its own tokens start_b .. start_b + n_b. Its keys, in position order, are its task's shared
    prefix (P_b tokens) and then its own tokens 0 .. start_b + n_b; position = P_b + own index = key column.
    Decode rows (one new token) attend as one batch and prefill chunks as another (see RowBatch), each cut into
    several where it would pad past the step's `TileLimits`.
    """

    offsets: torch.Tensor  # [B + 1]: row b's tokens are the stream's offsets[b] .. offsets[b + 1] (on the host)
    positions: torch.Tensor  # [N]
    write_slots: torch.Tensor  # [N]
    batches: list[RowBatch]

    @classmethod
    def of(
        cls, chunks: list[Chunk], slots: SlotTable, causal: bool = True, limits: TileLimits = UNBOUNDED
    ) -> StreamLayout:
        counts = [chunk.num_tokens for chunk in chunks]
        if sum(counts) == len(counts):
            return cls.of_decode(chunks, slots, causal, limits)
        num_new = long_tensor(counts)
        starts = long_tensor([chunk.start for chunk in chunks])
        prefix = long_tensor([chunk.row.num_prefix_tokens for chunk in chunks])
        key_lengths = prefix + starts + num_new
        key_slots = slots.key_slots([chunk.row for chunk in chunks], int(key_lengths.max()))  # [B, L]
        rows = RowTensors(num_new, starts, prefix, key_slots)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=HOST), num_new.cumsum(0)])
        new = torch.arange(int(num_new.max()), device=HOST)[None]  # [1, T_max]
        is_new = new < num_new[:, None]  # [B, T_max]
        columns = (prefix + starts)[:, None] + new  # [B, T_max]: a new token's key column is its position
        is_decode = num_new == 1
        return cls(
            offsets=offsets,
            positions=columns[is_new],
            write_slots=key_slots.gather(1, columns.clamp(max=key_slots.shape[1] - 1))[is_new],
            batches=[
                batch
                for selected in (is_decode.nonzero().flatten(), (~is_decode).nonzero().flatten())
                if selected.numel()
                for batch in row_batches(rows.select(selected), offsets[:-1][selected], limits, causal)
            ],
        )

    @classmethod
    def of_decode(cls, chunks: list[Chunk], slots: SlotTable, causal: bool, limits: TileLimits) -> StreamLayout:
        """`of` for a step whose rows each compute one new token (decode rows, the usual step): row b is the stream's
        token b, at its position, the row's last key column; the same tensors with fewer operations."""
        positions = long_tensor([chunk.row.num_prefix_tokens + chunk.start for chunk in chunks])
        key_lengths = positions + 1
        num_keys = int(key_lengths.max())
        key_slots = slots.key_slots([chunk.row for chunk in chunks], num_keys)  # [B, L]
        offsets = torch.arange(len(chunks) + 1, device=HOST)
        num_new = torch.ones_like(positions)
        if limits.fits(len(chunks), 1, num_keys):  # one batch, as `tiles` finds first (without its reductions)
            batches = [RowBatch.of(key_slots, key_lengths, offsets[:-1], num_new, positions, causal, num_keys, 1)]
        else:
            batches = RowBatch.tiles(key_slots, key_lengths, offsets[:-1], num_new, positions, limits, causal)
        return cls(offsets, positions, key_slots.gather(1, positions[:, None])[:, 0], batches)


@dataclass(frozen=True, slots=True)
class RowTensors:
    """Per row: new tokens, first new own token, shared-prefix length, and its key slots (prefix, then own)."""

    num_new: torch.Tensor  # [B]
    starts: torch.Tensor  # [B]
    prefix: torch.Tensor  # [B]
    key_slots: torch.Tensor  # [B, L]

    def select(self, index: torch.Tensor) -> RowTensors:
        return RowTensors(
            num_new=self.num_new.index_select(0, index),
            starts=self.starts.index_select(0, index),
            prefix=self.prefix.index_select(0, index),
            key_slots=self.key_slots.index_select(0, index),
        )


def row_batches(rows: RowTensors, offsets: torch.Tensor, limits: TileLimits, causal: bool = True) -> list[RowBatch]:
    """The attention layout of these rows, whose new tokens start at `offsets` in the stream (`causal` False: an
    encoder's rows, each token seeing all of its row's keys), in batches within `limits`."""
    key_lengths = rows.prefix + rows.starts + rows.num_new
    return RowBatch.tiles(rows.key_slots, key_lengths, offsets, rows.num_new, rows.prefix + rows.starts, limits, causal)


def own_token_ids(row: Sequence, start: int, num_tokens: int) -> list[int]:
    """Ids of the row's own tokens start..start+num_tokens, as its backbone's kind lays them out."""
    return row.request.kind.own_token_ids(row, start, num_tokens)
