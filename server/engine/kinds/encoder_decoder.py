"""An encoder-decoder (T5, BART): a row's encoder input is its prompt task's virtual tokens (PEFT puts them there) and
its input, run once, alone, in the step that starts the row; its own tokens are the decoder's (the start token, then
the answer), in the engine's packed steps like a causal row's, with a prefix task's keys and values in front of them
in self-attention. Cross-attention reads the row's encoder keys and values from the row's own slots in the pool's
cross-attention layers (see seq2seq.py for what transformers computes from the stream's shape, made per row here).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate, chain
from typing import TYPE_CHECKING, ClassVar

import torch
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from prompt_store.materialize import layer_prefix, split_prefix
from prompt_store.types import BackboneFingerprint, TaskArtifact
from server.engine.alibi import reference_attention
from server.engine.attention import CrossKV, RowBatch, StepKV, run_decoder
from server.engine.errors import InputTooLong
from server.engine.kinds.base import DecoderPrefix, ModelKind, PrefixCheck, SelfChecks, StepResult
from server.engine.kinds.seq2seq import Seq2Seq, encode
from server.engine.kv_pool import HOST, block_slots, long_tensor, slots_of
from server.engine.reference import cache_kwarg
from server.engine.types import KindName

if TYPE_CHECKING:
    from server.engine.model_runner import ModelRunner, StreamLayout
    from server.engine.readout import Readout
    from server.engine.request import Sequence
    from server.engine.scheduler import Chunk
    from server.engine.selfcheck import CheckRow


@dataclass(frozen=True, slots=True)
class EncoderDecoder(ModelKind):
    name: ClassVar[KindName] = "seq2seq"
    special_tokens_in_targets: ClassVar[bool] = True  # a candidate is a decoder target, with its end-of-sequence
    continues_input: ClassVar[bool] = False  # the answer starts the decoder's own sequence
    head_types: ClassVar[tuple[str, ...]] = ()

    seq2seq: Seq2Seq

    # ---- rows: the decoder's tokens are the row's own; the encoder's input has its own slots when it starts

    def num_embedded_tokens(self, row: Sequence) -> int:
        return 0  # a prompt task goes to the encoder

    def num_own_tokens(self, row: Sequence) -> int:
        return 1 + row.num_fed_targets + len(row.output_ids)

    def max_own_tokens(self, row: Sequence, max_new_tokens: int) -> int:
        """The longer of its encoder input and its decoder tokens."""
        return max(self.encoder_length(row), 1 + row.num_fed_targets + max_new_tokens)

    def own_token_ids(self, row: Sequence, start: int, num_tokens: int) -> list[int]:
        """The decoder's: the start token, then the candidate or the output."""
        return [self.seq2seq.decoder_start_id, *row.fed_targets, *row.output_ids][start : start + num_tokens]

    def encoder_length(self, row: Sequence) -> int:
        """Its encoder input: a prompt task's virtual tokens, then the input."""
        prompt = row.num_virtual_tokens if row.task is not None and not row.task.record.method.is_prefix else 0
        return prompt + row.request.num_input_tokens

    def scored_from(self, row: Sequence) -> int:
        return 0  # the decoder start token's logits give the first target's

    def has_kv_prefix(self, task: TaskArtifact | None, prompts_as_kv: bool) -> bool:
        """Only a prefix enters as keys and values: a prompt task goes to the encoder."""
        return task is not None and task.record.method.is_prefix

    # ---- intake

    def new_token_room(self, max_positions: int, asked: int, num_input: int, tasks: list[TaskArtifact | None]) -> int:
        """The encoder holds a prompt task's virtual tokens and the input; the decoder a prefix task's and the answer
        after its start token."""
        prompts = [t.record.num_virtual_tokens for t in tasks if t and not t.record.method.is_prefix]
        encoder = max(prompts, default=0) + num_input
        if encoder > max_positions:
            raise InputTooLong(
                f"expected at most {max_positions - encoder + num_input} input tokens (the encoder's {max_positions} "
                f"positions less {encoder - num_input} virtual tokens); found {num_input}"
            )
        prefix = max((t.record.num_virtual_tokens for t in tasks if t and t.record.method.is_prefix), default=0)
        room = max_positions - prefix  # the start token sits at position P; the last new token is never fed back
        if room < 1:
            raise InputTooLong(f"{prefix} virtual tokens leave no room in the decoder's {max_positions} positions")
        return min(asked, room)

    def positions_taken(self, num_input: int, tasks: list[TaskArtifact | None]) -> str:
        """The decoder's positions hold a prefix task's virtual tokens, then the answer (the input is the encoder's)."""
        prefix = max((t.record.num_virtual_tokens for t in tasks if t and t.record.method.is_prefix), default=0)
        return f"the decoder's {prefix} virtual tokens"

    def scored_lengths(self, num_input: int, num_targets: int) -> tuple[int, ...]:
        """The encoder's input; the decoder's start token, then the candidate."""
        return (num_input, 1 + num_targets)

    def num_pool_layers(self, fingerprint: BackboneFingerprint) -> int:
        """Its decoder layers twice: self-attention, then cross-attention (the row's encoder keys and values)."""
        return 2 * (fingerprint.num_decoder_layers or fingerprint.num_layers)

    # ---- the step: the encoder for each row it starts, then one decoder pass for all rows

    def prompt_rows(self, chunks: list[Chunk]) -> list[Sequence]:
        starting = [chunk.row for chunk in chunks if chunk.start == 0 and chunk.row.task]
        return [row for row in starting if row.task and not row.task.record.method.is_prefix]

    def forward(self, runner: ModelRunner, chunks: list[Chunk], readout: Readout) -> StepResult:
        """The decoder pass stores the starting rows' cross-attention keys and values in their own slots. The step's
        host tensors (the layout's and the cross-attention's indices, the encoder's and the decoder's token ids, the
        positions read out) reach the device in the stream's one copy."""
        starting = [chunk.row for chunk in chunks if chunk.start == 0]
        cross = self.cross_batches(chunks, runner)
        slots = [slots_of(row.block_ids, self.encoder_length(row), runner.pool.block_size) for row in starting]
        decoder_ids = long_tensor(t for chunk in chunks for t in self.own_token_ids(chunk.row, chunk.start,
                                                                                   chunk.num_tokens))  # fmt: skip
        extra = (
            *(t for batch in cross for t in batch.index()),
            torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long, device=HOST),
            long_tensor(chain.from_iterable(row.request.input_ids for row in starting)),
            decoder_ids,
            long_tensor(readout.logit_index),
        )
        layout, kv, on_device = runner.stream(chunks, True, extra)
        *cross_index, cross_slots, encoder_ids, decoder_ids, logit_index = on_device
        width = RowBatch.num_index
        kv.cross = CrossKV(
            first_layer=self.seq2seq.num_decoder_layers,
            write_slots=cross_slots,
            batches=[batch.with_index(cross_index[i * width : (i + 1) * width]) for i, batch in enumerate(cross)],
            modules=self.seq2seq.cross_attentions,
        )
        inputs = encoder_ids.split([len(row.request.input_ids) for row in starting])
        logits = self.decode(runner, starting, inputs, decoder_ids, layout, kv)  # [N, V]
        return StepResult(logits[logit_index], None)

    def decode(
        self, runner: ModelRunner, starting: list[Sequence], inputs: tuple[torch.Tensor, ...],
        decoder_ids: torch.Tensor, layout: StreamLayout, kv: StepKV,
    ) -> torch.Tensor:  # fmt: skip
        """The encoder over each starting row's input ids (`inputs`, on the device), then the decoder over the
        stream's `decoder_ids`: every position's logits [N, V]."""
        seq2seq, device = self.seq2seq, runner.device
        encoded = [self.encode_row(runner, row, ids) for row, ids in zip(starting, inputs, strict=True)]  # [S, H]
        hidden_size = runner.backbone.fingerprint.hidden_size
        hidden = torch.cat(encoded) if encoded else torch.zeros(1, hidden_size, device=device)
        states = hidden.to(runner.backbone.dtype)[None]  # [1, sum S, H]: what the cross-attention projects
        kv.relative_bias = seq2seq.relative_bias
        if seq2seq.positions is not None:
            seq2seq.positions.positions = layout.positions[None]
        lengths = [len(e) for e in encoded] or [1]
        try:
            with runner.tasks.adapters.hooks.source(states, runner.row_adapters(list(starting) or [None]), lengths):
                return run_decoder(
                    runner.model,
                    kv,
                    seq2seq.num_decoder_layers,
                    decoder_input_ids=decoder_ids[None],  # [1, N]
                    encoder_outputs=BaseModelOutput(last_hidden_state=states),
                )
        finally:
            if seq2seq.positions is not None:
                seq2seq.positions.positions = None

    def encode_row(self, runner: ModelRunner, row: Sequence, input_ids: torch.Tensor) -> torch.Tensor:
        """[S, H]: the row's encoder pass over its input ids [T] (on the device), alone, with its LoRA / IA3 task's
        deltas."""
        embeds = self.encoder_input(runner, row, input_ids)
        with runner.adapted([row], [len(embeds)]):
            return encode(runner.model, embeds)

    def encoder_input(self, runner: ModelRunner, row: Sequence, input_ids: torch.Tensor) -> torch.Tensor:
        """[S, H]: a prompt task's virtual tokens (as PEFT puts them, before the input), then the input embedded."""
        embeds = runner.embed_tokens(input_ids)
        if row.task is None or row.task.record.method.is_prefix:
            return embeds
        prompt = runner.prompts[row.task.key].to(embeds.dtype)  # [P, H]
        return torch.cat([prompt, embeds])

    def cross_batches(self, chunks: list[Chunk], runner: ModelRunner) -> list[RowBatch]:
        """Cross-attention for every row of the step, on the host: its new tokens see all of its encoder keys, slots
        0..S-1 of its own blocks in the cross-attention layers (in batches within the runner's limits)."""
        lengths = torch.tensor([self.encoder_length(chunk.row) for chunk in chunks], device=HOST)
        own_slots = block_slots([chunk.row.block_ids for chunk in chunks], runner.pool.block_size)
        column = torch.arange(int(lengths.max()), device=HOST)[None]  # [1, S]
        key_slots = own_slots.gather(1, column.clamp(max=own_slots.shape[1] - 1).expand(len(chunks), -1))
        num_new = torch.tensor([chunk.num_tokens for chunk in chunks], device=HOST)
        starts = long_tensor(accumulate((chunk.num_tokens for chunk in chunks[:-1]), initial=0))  # in the stream
        first_positions = torch.zeros_like(num_new)
        return RowBatch.tiles(key_slots, lengths, starts, num_new, first_positions, runner.limits, causal=False)

    # ---- the self-check: the prompt before the encoder's input, a prefix in the decoder's self-attention

    def self_check(self, checks: SelfChecks) -> str:
        return checks.decoding(self)

    def saved_prompt(self, prompt: torch.Tensor) -> torch.Tensor:
        """PEFT saves an encoder and a decoder prompt: 2P rows."""
        return torch.cat([prompt, prompt])

    def check_prefix(self, checks: SelfChecks) -> PrefixCheck:
        """Random prefix rows as PEFT saves them ([P, L*2*kv_dim], L the config's layers), and the keys and values
        each decoder layer's self-attention reads from them."""
        backbone, fingerprint = checks.backbone, checks.backbone.fingerprint
        width = fingerprint.num_layers * 2 * fingerprint.num_key_value_heads * fingerprint.head_dim
        saved = torch.randn((checks.num_virtual_tokens, width), generator=checks.generator)
        keys, values = split_prefix(saved.to(backbone.device, backbone.dtype), fingerprint)
        return PrefixCheck(saved, None, layer_prefix(keys, values, fingerprint))

    @torch.inference_mode()
    def reference_logprobs(self, model: PreTrainedModel, check: CheckRow, new_ids: list[int]) -> torch.Tensor:
        """After each decoder token: the virtual tokens before the encoder's input, a prefix's keys and values in
        the decoder's self-attention cache (as PEFT's forward puts them), eager attention."""
        embed = model.get_input_embeddings()
        encoder_embeds = embed(torch.tensor([check.input_ids], device=model.device))  # [1, S, H]
        if check.virtual_embeds is not None:
            encoder_embeds = torch.cat([check.virtual_embeds[None].to(encoder_embeds.dtype), encoder_embeds], dim=1)
        decoder = torch.tensor([[self.seq2seq.decoder_start_id, *new_ids[:-1]]], device=model.device)
        cache = prefix_cache(check.decoder_prefix) if check.decoder_prefix is not None else None
        with reference_attention(model):
            logits = model(inputs_embeds=encoder_embeds, decoder_input_ids=decoder, use_cache=cache is not None,
                           **{cache_kwarg(model): cache}).logits  # type: ignore[operator]  # fmt: skip
        return torch.log_softmax(logits[0].float(), dim=-1)


def prefix_cache(prefix: DecoderPrefix) -> EncoderDecoderCache:
    """A decoder self-attention cache holding a prefix's keys and values, an empty cross-attention one."""
    self_attention = DynamicCache()
    for layer, (keys, values) in enumerate(zip(*prefix, strict=True)):
        self_attention.update(keys[None], values[None], layer)  # [1, kv_heads, P, head_dim]
    return EncoderDecoderCache(self_attention, DynamicCache())
