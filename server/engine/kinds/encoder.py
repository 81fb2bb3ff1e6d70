"""An encoder (BERT, RoBERTa, ELECTRA, DeBERTa-v2, DistilBERT): classification only. Its rows are packed into one
stream through the engine's attention, each row whole, in one step, its tokens seeing each other (`packed`: prefixes
apply); an encoder whose attention cannot use the pool (DeBERTa-v2's is its own; DistilBERT's layers have no
layer_idx, so they run on SDPA) runs its rows padded into one batch with an attention mask (prompt tasks only).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from transformers import PretrainedConfig, PreTrainedModel

from prompt_store.types import SEQ_CLS, TOKEN_CLS, TaskArtifact
from server.engine.alibi import reference_attention
from server.engine.attention import Routing, attention_routing, run_encoder
from server.engine.errors import UnsupportedBackbone, WrongKind
from server.engine.heads import BareHead, Head, bare_head
from server.engine.kinds.base import ModelKind, SelfChecks, StepResult
from server.engine.kv_pool import long_tensor
from server.engine.types import KindName

if TYPE_CHECKING:
    from server.engine.model_runner import ModelRunner
    from server.engine.readout import Readout
    from server.engine.request import Sequence
    from server.engine.scheduler import Chunk

STOCK_ATTENTION = "sdpa"
SERVED_ENCODERS = (
    "Encoders served: BERT, RoBERTa, ELECTRA (base, large) and DeBERTa-v2 (sequence and token heads), DistilBERT "
    "(token heads); prefix tuning where the attention takes past keys and values (BERT, RoBERTa, ELECTRA)"
)


@dataclass(frozen=True, slots=True)
class Encoder(ModelKind):
    """`first_position`: its first position id (RoBERTa counts from padding_idx + 1)."""

    name: ClassVar[KindName] = "encoder"
    computes_rows_whole: ClassVar[bool] = True
    head_types: ClassVar[tuple[str, ...]] = (SEQ_CLS, TOKEN_CLS)
    generation_routes: ClassVar[tuple[str, ...]] = ()

    packed: bool
    first_position: int

    @classmethod
    def of(cls, model: PreTrainedModel) -> Encoder:
        check_input_width(model)
        padding_idx = getattr(getattr(model.base_model, "embeddings", None), "padding_idx", None)
        offset = padding_idx + 1 if padding_idx is not None else 0  # RoBERTa's embeddings keep it; BERT's do not
        routing = attention_routing(model.base_model)
        if routing is Routing.STOCK:  # padded rows need transformers' own attention, which reads the padding mask
            model.set_attn_implementation(STOCK_ATTENTION)  # type: ignore[operator]
        return cls(packed=routing is Routing.POOL, first_position=offset)

    # ---- rows

    def sequence_head_token(self, row: Sequence) -> int:
        """Its first token (a prompt task's first virtual token, as PEFT places them), as transformers' heads read."""
        return 0

    def has_kv_prefix(self, task: TaskArtifact | None, prompts_as_kv: bool) -> bool:
        """Only a prefix enters as keys and values: an encoder's prompt sees its input."""
        return task is not None and task.record.method.is_prefix

    # ---- intake and loading

    def check_generation(self, what: str, model_id: str) -> None:
        raise WrongKind(
            f"expected a generative backbone for {what}; this server's backbone ({model_id}) is an encoder: use "
            "/v1/classify"
        )

    def heads(
        self, config: PretrainedConfig, model: PreTrainedModel, missing: set[str], loaded_type: str
    ) -> tuple[dict[str, Head], BareHead | None]:
        """Its sequence and token heads (one at least), and the trained head of its checkpoint, which it loads with."""
        heads, _ = ModelKind.heads(self, config, model, missing, loaded_type)
        if not heads:
            raise UnsupportedBackbone(
                f"expected an encoder whose sequence or token classification head promptserve can run; found "
                f"{config.model_type}, whose heads apply layers of their own (see the warnings above). "
                f"{SERVED_ENCODERS}"
            )
        bare = bare_head(config, loaded_type, model, heads[loaded_type], missing) if loaded_type in heads else None
        return heads, bare

    def takes_prefix(self) -> bool:
        return self.packed

    # ---- the step

    def forward(self, runner: ModelRunner, chunks: list[Chunk], readout: Readout) -> StepResult:
        if not self.packed:
            return StepResult(None, self.run_padded(runner, chunks)[runner.index(readout.hidden_index)])
        token_ids, placed = runner.stream_tokens(chunks)
        extra = (token_ids, long_tensor(readout.hidden_index))
        layout, kv, (token_ids, hidden_index) = runner.stream(chunks, False, extra)
        embeds = runner.input_embeds(token_ids, placed)[None]  # [1, N, H]
        positions = (layout.positions + self.first_position)[None]  # [1, N]
        encoded = run_encoder(runner.model.base_model, kv, inputs_embeds=embeds, position_ids=positions)
        return StepResult(None, encoded[hidden_index])

    def run_padded(self, runner: ModelRunner, chunks: list[Chunk]) -> torch.Tensor:
        """Its rows (each whole) right-padded into one batch with a mask, so rows of different tasks still share one
        forward pass; hidden states [N, H] in stream order."""
        rows = [runner.row_embeds(chunk.row) for chunk in chunks]
        width = max(len(row) for row in rows)
        embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=runner.device)
        for i, row in enumerate(rows):
            embeds[i, : len(row)], mask[i, : len(row)] = row, 1
        padded = [
            (row, n)
            for chunk, r in zip(chunks, rows, strict=True)
            for row, n in ((chunk.row, len(r)), (None, width - len(r)))
        ]
        with runner.adapted([row for row, _ in padded], [n for _, n in padded], width):  # row i's: i * W ..
            hidden = runner.model.base_model(inputs_embeds=embeds, attention_mask=mask)[0]  # [B, W, H]
        return hidden[mask.bool()]

    # ---- the self-check: final hidden states, which every classification head reads

    def self_check(self, checks: SelfChecks) -> str:
        return checks.hidden_states(self)

    @torch.inference_mode()
    def reference_hidden(
        self, model: PreTrainedModel, virtual_embeds: torch.Tensor | None, input_ids: list[int]
    ) -> torch.Tensor:
        """[T, H]: its own forward of the row (virtual tokens as input embeddings first), eager attention where the
        engine's is ours (DeBERTa-v2's attention is its own)."""
        embeds = model.get_input_embeddings()(torch.tensor([input_ids], device=model.device))
        if virtual_embeds is not None:
            embeds = torch.cat([virtual_embeds[None].to(embeds.dtype), embeds], dim=1)
        with reference_attention(model) if self.packed else contextlib.nullcontext():
            hidden = model.base_model(inputs_embeds=embeds)[0]  # type: ignore[operator]
        return hidden[0].float()


def check_input_width(model: PreTrainedModel) -> None:
    """A prompt task's vectors are hidden_size wide (PEFT's token_dim, as the store checks them): an encoder whose
    input embeddings are narrower (ALBERT's and ELECTRA-small's embedding_size) could take none of them."""
    config = model.config.get_text_config()
    width = model.get_input_embeddings().embedding_dim
    if width != config.hidden_size:
        raise UnsupportedBackbone(
            f"expected an encoder whose input embeddings are as wide as its hidden states ({config.hidden_size}), "
            f"as prompt tasks' vectors are; found {config.model_type} with {width}-wide input embeddings "
            f"(embedding_size). {SERVED_ENCODERS}"
        )
