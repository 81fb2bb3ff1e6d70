"""Builds the step's tensors in one place and runs the frozen backbone over one packed stream of tokens.

A step's chunks (a decode token, or a piece of a prefill) become one stream [1, N], rows one after another with no
padding, with each token's position. Three kinds of rows share it:
- plain rows: embed(x) on the bare backbone
- rows whose task is held as keys and values (prefix tasks, and by default prompt tasks): the row's keys start with
  the task's shared blocks, and its own positions continue after them
- prompt rows fed as embeddings: the task's vectors are the row's first own tokens

An encoder's rows (BERT, RoBERTa) run the same way, each row whole and attending both ways; an encoder whose
attention cannot use the pool (DeBERTa-v2's is its own, DistilBERT's layers have no index) runs its rows padded into
one batch instead. The step returns the logits and the final hidden states of the stream positions its `Readout`
names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutput

from prompt_store.types import TaskKey
from server.engine.attention import CrossKV, RowBatch, StepKV, run_backbone, run_decoder, run_encoder
from server.engine.backbone import Backbone
from server.engine.kv_pool import KVPool, slots_of
from server.engine.readout import Readout
from server.engine.request import Sequence
from server.engine.scheduler import Chunk
from server.engine.seq2seq import Seq2Seq, encode
from server.engine.task_cache import TaskCache

Prompts = dict[TaskKey, torch.Tensor]  # a step's prompt vectors [P, H], by task version, loaded before the pass


class ModelRunner:
    def __init__(self, backbone: Backbone, pool: KVPool, tasks: TaskCache) -> None:
        self.backbone = backbone
        self.model = backbone.model
        self.device = backbone.device
        self.pool = pool
        self.tasks = tasks
        self.embed_tokens = backbone.model.get_input_embeddings()
        self.prompts: Prompts = {}  # the current step's

    def prompt_rows(self, chunks: list[Chunk]) -> list[Sequence]:
        """The rows whose prompt task's vectors this step feeds as input embeddings (an encoder-decoder's: to its
        encoder, in the step that starts the row)."""
        encoder = self.backbone.encoder
        if encoder is not None and not encoder.packed:
            return [chunk.row for chunk in chunks if chunk.row.num_embedded_tokens and chunk.row.task]
        if self.backbone.seq2seq is not None:
            starting = [chunk.row for chunk in chunks if chunk.start == 0 and chunk.row.task]
            return [row for row in starting if row.task and not row.task.record.method.is_prefix]
        return [chunk.row for chunk in chunks if chunk.start < chunk.row.num_embedded_tokens and chunk.row.task]

    def load_prompts(self, chunks: list[Chunk]) -> Prompts:
        return {row.task.key: self.tasks.embeddings_of(row.task) for row in self.prompt_rows(chunks) if row.task}

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], readout: Readout, prompts: Prompts | None = None) -> StepResult:
        """Compute every chunk in one pass: the logits [K, V] and hidden states [M, H] the readout asks for.
        `prompts`: the vectors of the rows' prompt tasks fed as embeddings (None: loaded here)."""
        self.prompts = self.load_prompts(chunks) if prompts is None else prompts
        try:
            return self.forward(chunks, readout)
        finally:
            self.prompts = {}  # a retired task's vectors are not kept past its last step

    def forward(self, chunks: list[Chunk], readout: Readout) -> StepResult:
        device = self.device
        logit_index = torch.tensor(readout.logit_index, dtype=torch.long, device=device)
        hidden_index = torch.tensor(readout.hidden_index, dtype=torch.long, device=device)
        encoder = self.backbone.encoder
        if encoder is not None and not encoder.packed:
            return StepResult(None, self.run_padded(chunks)[hidden_index])
        layout = StreamLayout.of(chunks, self.pool.block_size, causal=encoder is None)
        kv = StepKV(
            self.pool.keys,
            self.pool.values,
            write_slots=layout.write_slots.to(device),
            batches=[batch.to(device) for batch in layout.batches],
        )
        if self.backbone.seq2seq is not None:
            return StepResult(self.run_decoder(chunks, layout, kv, self.backbone.seq2seq)[logit_index], None)
        embeds = self.input_embeds(chunks, layout.offsets.tolist())[None]  # [1, N, H]
        if encoder is not None:
            positions = (layout.positions + encoder.position_offset)[None].to(device)
            encoded = run_encoder(self.model.base_model, kv, inputs_embeds=embeds, position_ids=positions)
            return StepResult(None, encoded[hidden_index])
        logits, hidden = run_backbone(
            self.model,
            kv,
            hidden_index,
            inputs_embeds=embeds,
            position_ids=layout.positions[None].to(device),  # [1, N]
            logits_to_keep=logit_index,
        )
        return StepResult(logits, hidden)

    def run_padded(self, chunks: list[Chunk]) -> torch.Tensor:
        """An encoder without our attention: its rows (each whole) right-padded into one batch with a mask, so rows
        of different tasks still share one forward pass; hidden states [N, H] in stream order."""
        rows = [self.row_embeds(chunk.row) for chunk in chunks]
        width = max(len(row) for row in rows)
        embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            embeds[i, : len(row)], mask[i, : len(row)] = row, 1
        hidden = self.model.base_model(inputs_embeds=embeds, attention_mask=mask)[0]  # [B, W, H]
        return hidden[mask.bool()]

    def row_embeds(self, row: Sequence) -> torch.Tensor:
        """[T, H]: a row's own tokens embedded, a prompt task's vectors first."""
        ids = own_token_ids(row, 0, row.num_own_tokens)
        embeds = self.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.device))
        if row.num_embedded_tokens and row.task is not None:
            embeds[: row.num_embedded_tokens] = self.prompts[row.task.key].to(embeds.dtype)
        return embeds

    def run_decoder(self, chunks: list[Chunk], layout: StreamLayout, kv: StepKV, seq2seq: Seq2Seq) -> torch.Tensor:
        """An encoder-decoder's step: the encoder for each row the step starts, then one decoder pass for all rows,
        which stores the starting rows' cross-attention keys and values in their own slots; logits [N, V]."""
        starting = [chunk.row for chunk in chunks if chunk.start == 0]
        encoded = [encode(self.model, self.encoder_input(row)) for row in starting]  # each [S, H]
        hidden = (
            torch.cat(encoded) if encoded else torch.zeros(1, self.backbone.fingerprint.hidden_size, device=self.device)
        )
        slots = [slots_of(row.block_ids, row.encoder_length, self.pool.block_size) for row in starting]
        kv.cross = CrossKV(
            first_layer=seq2seq.num_decoder_layers,
            write_slots=(torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long)).to(self.device),
            batches=[cross_batch(chunks, layout.offsets, self.pool.block_size).to(self.device)],
        )
        kv.relative_bias = seq2seq.relative_bias
        token_ids = [token for chunk in chunks for token in own_token_ids(chunk.row, chunk.start, chunk.num_tokens)]
        if seq2seq.positions is not None:
            seq2seq.positions.positions = layout.positions[None].to(self.device)
        try:
            return run_decoder(
                self.model,
                kv,
                seq2seq.num_decoder_layers,
                decoder_input_ids=torch.tensor([token_ids], device=self.device),
                encoder_outputs=BaseModelOutput(last_hidden_state=hidden.to(self.backbone.dtype)[None]),
            )
        finally:
            if seq2seq.positions is not None:
                seq2seq.positions.positions = None

    def encoder_input(self, row: Sequence) -> torch.Tensor:
        """[S, H]: a prompt task's virtual tokens (as PEFT puts them, before the input), then the input embedded."""
        embeds = self.embed_tokens(torch.tensor(row.request.input_ids, dtype=torch.long, device=self.device))
        if row.task is None or row.task.record.method.is_prefix:
            return embeds
        prompt = self.prompts[row.task.key].to(embeds.dtype)  # [P, H]
        return torch.cat([prompt, embeds])

    def input_embeds(self, chunks: list[Chunk], offsets: list[int]) -> torch.Tensor:
        """[N, H]: each chunk's own tokens embedded; an embedded-prompt row's virtual tokens from its task."""
        token_ids = [token for chunk in chunks for token in own_token_ids(chunk.row, chunk.start, chunk.num_tokens)]
        assert len(token_ids) == offsets[-1], "one id per token of the stream"
        embeds = self.embed_tokens(torch.tensor(token_ids, dtype=torch.long, device=self.device))
        for chunk, offset in zip(chunks, offsets, strict=False):
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
class StepResult:
    logits: torch.Tensor | None  # [K, V] float32, the readout's logit positions in order (None: an encoder)
    hidden: torch.Tensor | None  # [M, H], the readout's hidden positions in order


@dataclass(frozen=True, slots=True)
class StreamLayout:
    """Where every token of a step's packed stream lives: built with a few tensor operations, whatever the rows.

    Row b computes its own tokens start_b .. start_b + n_b. Its keys, in position order, are its task's shared
    prefix (P_b tokens) and then its own tokens 0 .. start_b + n_b; position = P_b + own index = key column.
    Decode rows (one new token) attend as one batch and prefill chunks as another (see RowBatch).
    """

    offsets: torch.Tensor  # [B + 1]: row b's tokens are the stream's offsets[b] .. offsets[b + 1]
    positions: torch.Tensor  # [N]
    write_slots: torch.Tensor  # [N]
    batches: list[RowBatch]

    @classmethod
    def of(cls, chunks: list[Chunk], block_size: int, causal: bool = True) -> StreamLayout:
        rows = RowTensors(
            num_new=torch.tensor([chunk.num_tokens for chunk in chunks]),
            starts=torch.tensor([chunk.start for chunk in chunks]),
            prefix=torch.tensor([chunk.row.num_prefix_tokens for chunk in chunks]),
            own_slots=block_slots([chunk.row.block_ids for chunk in chunks], block_size),
            prefix_slots=block_slots([task_block_ids(chunk.row) for chunk in chunks], block_size),
        )
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), rows.num_new.cumsum(0)])
        new = torch.arange(int(rows.num_new.max()))[None]  # [1, T_max]
        is_new = new < rows.num_new[:, None]  # [B, T_max]
        own_new = (rows.starts[:, None] + new).clamp(max=rows.own_slots.shape[1] - 1)
        is_decode = rows.num_new == 1
        return cls(
            offsets=offsets,
            positions=(rows.prefix[:, None] + rows.starts[:, None] + new)[is_new],
            write_slots=rows.own_slots.gather(1, own_new)[is_new],
            batches=[
                row_batch(rows.select(selected), offsets[:-1][selected], causal)
                for selected in (is_decode.nonzero().flatten(), (~is_decode).nonzero().flatten())
                if selected.numel()
            ],
        )


@dataclass(frozen=True, slots=True)
class RowTensors:
    """Per row of a step: new tokens, first new own token, shared-prefix length, and its slots."""

    num_new: torch.Tensor  # [B]
    starts: torch.Tensor  # [B]
    prefix: torch.Tensor  # [B]
    own_slots: torch.Tensor  # [B, own blocks * block_size]
    prefix_slots: torch.Tensor  # [B, task blocks * block_size]

    def select(self, index: torch.Tensor) -> RowTensors:
        return RowTensors(
            num_new=self.num_new.index_select(0, index),
            starts=self.starts.index_select(0, index),
            prefix=self.prefix.index_select(0, index),
            own_slots=self.own_slots.index_select(0, index),
            prefix_slots=self.prefix_slots.index_select(0, index),
        )


def row_batch(rows: RowTensors, offsets: torch.Tensor, causal: bool = True) -> RowBatch:
    """The attention layout of these rows, whose new tokens start at `offsets` in the stream (`causal` False: an
    encoder's rows, each token seeing all of its row's keys)."""
    key_lengths = rows.prefix + rows.starts + rows.num_new
    column = torch.arange(int(key_lengths.max()))[None]  # [1, L]
    from_prefix = rows.prefix_slots.gather(
        1, column.clamp(max=rows.prefix_slots.shape[1] - 1).expand(len(rows.num_new), -1)
    )
    from_own = rows.own_slots.gather(1, (column - rows.prefix[:, None]).clamp(0, rows.own_slots.shape[1] - 1))
    gathered = torch.where(column < rows.prefix[:, None], from_prefix, from_own)
    new = torch.arange(int(rows.num_new.max()))[None]  # [1, T]
    is_new = new < rows.num_new[:, None]  # [R, T]
    return RowBatch(
        gather_slots=torch.where(column < key_lengths[:, None], gathered, 0),
        key_lengths=key_lengths,
        query_index=torch.where(is_new, offsets[:, None] + new, 0),
        query_positions=torch.where(is_new, rows.prefix[:, None] + rows.starts[:, None] + new, 0),
        output_index=(torch.arange(len(rows.num_new))[:, None] * new.shape[1] + new)[is_new],
        stream_index=(offsets[:, None] + new)[is_new],
        causal=causal,
    )


def cross_batch(chunks: list[Chunk], offsets: torch.Tensor, block_size: int) -> RowBatch:
    """Cross-attention for every row of the step: its new tokens see all of its encoder keys, slots 0..S-1 of its
    own blocks in the cross-attention layers."""
    num_new = torch.tensor([chunk.num_tokens for chunk in chunks])
    lengths = torch.tensor([chunk.row.encoder_length for chunk in chunks])
    own_slots = block_slots([chunk.row.block_ids for chunk in chunks], block_size)
    column = torch.arange(int(lengths.max()))[None]  # [1, S]
    gathered = own_slots.gather(1, column.clamp(max=own_slots.shape[1] - 1).expand(len(chunks), -1))
    new = torch.arange(int(num_new.max()))[None]  # [1, T]
    is_new = new < num_new[:, None]
    starts = offsets[:-1]
    return RowBatch(
        gather_slots=torch.where(column < lengths[:, None], gathered, 0),
        key_lengths=lengths,
        query_index=torch.where(is_new, starts[:, None] + new, 0),
        query_positions=torch.zeros_like(is_new, dtype=torch.long),
        output_index=(torch.arange(len(chunks))[:, None] * new.shape[1] + new)[is_new],
        stream_index=(starts[:, None] + new)[is_new],
        causal=False,
    )


def block_slots(block_ids: list[list[int]], block_size: int) -> torch.Tensor:
    """[B, blocks * size]: the slots of each row's blocks in order (rows padded with block 0, at least one)."""
    width = max(1, *map(len, block_ids))
    table = torch.tensor([ids + [0] * (width - len(ids)) for ids in block_ids])  # [B, blocks]
    return (table[:, :, None] * block_size + torch.arange(block_size)).flatten(1)


def task_block_ids(row: Sequence) -> list[int]:
    return row.task_blocks.block_ids if row.task_blocks is not None else []


def own_token_ids(row: Sequence, start: int, num_tokens: int) -> list[int]:
    """Ids of the row's own tokens start..start+num_tokens (0 for embedded virtual tokens: the task supplies them;
    an encoder-decoder row's are its decoder's: the start token, then the output)."""
    if row.request.decoder_start_id is not None:
        return [row.request.decoder_start_id, *row.fed_targets, *row.output_ids][start : start + num_tokens]
    embedded, inputs = row.num_embedded_tokens, row.request.input_ids + row.fed_targets
    ids = [0] * max(0, min(embedded, start + num_tokens) - start)
    first = max(start - embedded, 0)
    last = max(start + num_tokens - embedded, 0)  # a chunk may end among the embedded virtual tokens
    ids += inputs[first:last]
    if last > len(inputs):
        ids += row.output_ids[max(first - len(inputs), 0) : last - len(inputs)]
    return ids
