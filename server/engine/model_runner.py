"""Builds the step's tensors in one place and runs the frozen backbone over one packed stream of tokens.

A step's chunks (a decode token, or a piece of a prefill) become one stream [1, N], rows one after another with no
padding, with each token's position. Three kinds of rows share it:
- plain rows: embed(x) on the bare backbone
- rows whose task is held as keys and values (prefix tasks, and by default prompt tasks): the row's keys start with
  the task's shared blocks, and its own positions continue after them
- prompt rows fed as embeddings: the task's vectors are the row's first own tokens
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from server.engine.attention import StepKV, run_backbone
from server.engine.backbone import Backbone
from server.engine.kv_pool import KVPool, slots_of
from server.engine.request import Sequence
from server.engine.scheduler import Chunk
from server.engine.task_cache import TaskCache


@dataclass(slots=True)
class RowSlots:
    """Pool slots of one chunk's row: all its keys in position order, and where its new tokens go."""

    keys: torch.Tensor  # [L]
    new: torch.Tensor  # [T]


class ModelRunner:
    def __init__(self, backbone: Backbone, pool: KVPool, tasks: TaskCache) -> None:
        self.backbone = backbone
        self.model = backbone.model
        self.device = backbone.device
        self.pool = pool
        self.tasks = tasks
        self.embed_tokens = backbone.model.get_input_embeddings()

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Compute every chunk in one pass; returns the logits [K, V] of the rows whose chunk is last, in order."""
        offsets = [0]
        for chunk in chunks:
            offsets.append(offsets[-1] + chunk.num_tokens)
        kv = self.step_kv(chunks, offsets)
        keep = [offsets[i + 1] - 1 for i, chunk in enumerate(chunks) if chunk.is_last]
        return run_backbone(
            self.model,
            kv,
            inputs_embeds=self.input_embeds(chunks, offsets)[None],  # [1, N, H]
            position_ids=self.positions(chunks)[None].to(self.device),  # [1, N]
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
        )

    def input_embeds(self, chunks: list[Chunk], offsets: list[int]) -> torch.Tensor:
        """[N, H]: each chunk's own tokens embedded; an embedded-prompt row's virtual tokens from its task."""
        token_ids = [token for chunk in chunks for token in own_token_ids(chunk.row, chunk.start, chunk.num_tokens)]
        embeds = self.embed_tokens(torch.tensor(token_ids, dtype=torch.long, device=self.device))
        for chunk, offset in zip(chunks, offsets, strict=False):
            row, end = chunk.row, min(chunk.start + chunk.num_tokens, chunk.row.num_embedded_tokens)
            if chunk.start < end and row.task is not None:
                prompt = self.tasks.embeddings_of(row.task)  # [P, H]
                embeds[offset : offset + end - chunk.start] = prompt[chunk.start : end].to(embeds.dtype)
        return embeds

    def positions(self, chunks: list[Chunk]) -> torch.Tensor:
        """[N]: own token j of a row sits after the row's shared prefix, at num_prefix_tokens + j."""
        first = [chunk.row.num_prefix_tokens + chunk.start for chunk in chunks]
        return torch.cat([torch.arange(s, s + chunk.num_tokens) for s, chunk in zip(first, chunks, strict=True)])

    def step_kv(self, chunks: list[Chunk], offsets: list[int]) -> StepKV:
        rows = [self.row_slots(chunk) for chunk in chunks]
        num_new = [chunk.num_tokens for chunk in chunks]
        width = max(num_new)
        query_index = pad_sequence([torch.arange(o, o + n) for o, n in zip(offsets, num_new, strict=False)], True)
        end_positions = [len(r.keys) for r in rows]
        query_positions = pad_sequence(
            [torch.arange(end - n, end) for end, n in zip(end_positions, num_new, strict=True)], batch_first=True
        )  # padding: position 0, so every query row sees at least one key
        output_index = torch.cat([torch.arange(b * width, b * width + n) for b, n in enumerate(num_new)])
        device = self.device
        return StepKV(
            self.pool.keys,
            self.pool.values,
            write_slots=torch.cat([r.new for r in rows]).to(device),
            gather_slots=pad_sequence([r.keys for r in rows], batch_first=True).to(device),
            key_lengths=torch.tensor(end_positions, device=device),
            query_index=query_index.to(device),
            query_positions=query_positions.to(device),
            output_index=output_index.to(device),
        )

    def row_slots(self, chunk: Chunk) -> RowSlots:
        row, size = chunk.row, self.pool.block_size
        own = slots_of(row.block_ids, chunk.start + chunk.num_tokens, size)  # [start + T]
        keys = own
        if row.task_blocks is not None:
            keys = torch.cat([slots_of(row.task_blocks.block_ids, row.num_prefix_tokens, size), own])
        return RowSlots(keys=keys, new=own[chunk.start :])


def own_token_ids(row: Sequence, start: int, num_tokens: int) -> list[int]:
    """Ids of the row's own tokens start..start+num_tokens (0 for embedded virtual tokens: the task supplies them)."""
    embedded, inputs = row.num_embedded_tokens, row.request.input_ids
    ids = [0] * max(0, min(embedded, start + num_tokens) - start)
    first = max(start - embedded, 0)
    last = start + num_tokens - embedded
    ids += inputs[first:last]
    if last > len(inputs):
        ids += row.output_ids[max(first - len(inputs), 0) : last - len(inputs)]
    return ids
