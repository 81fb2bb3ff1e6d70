"""A causal LM (Llama, GPT-2, Mistral, ...): the interface's defaults, its rows one causal stream over the pool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from transformers import PreTrainedModel

from server.engine.alibi import num_kv_heads, reference_attention
from server.engine.attention import run_backbone, unrouted_attention
from server.engine.kinds.base import ModelKind, SelfChecks, StepResult
from server.engine.kv_pool import long_tensor
from server.engine.types import KindName

if TYPE_CHECKING:
    from server.engine.model_runner import ModelRunner
    from server.engine.readout import Readout
    from server.engine.scheduler import Chunk
    from server.engine.selfcheck import CheckRow


@dataclass(frozen=True, slots=True)
class Causal(ModelKind):
    name: ClassVar[KindName] = "causal"

    def check_prompt_tokens(self, what: str, model_id: str) -> None:
        """Its prompt is its own tokens: served."""

    def why_unserved(self, model: PreTrainedModel) -> str | None:
        """Its every attention layer must run through the engine's attention (a wrapped family's too)."""
        return unrouted_attention(model, num_kv_heads(model.config))

    def forward(self, runner: ModelRunner, chunks: list[Chunk], readout: Readout) -> StepResult:
        token_ids, placed = runner.stream_tokens(chunks)
        read = (long_tensor(readout.logit_index), long_tensor(readout.hidden_index))
        layout, kv, (token_ids, logit_index, hidden_index) = runner.stream(chunks, True, (token_ids, *read))
        logits, hidden = run_backbone(
            runner.model,
            kv,
            hidden_index if readout.hidden_index else None,  # None: no hidden state read
            inputs_embeds=runner.input_embeds(token_ids, placed)[None],  # [1, N, H]
            position_ids=layout.positions[None],  # [1, N]
            logits_to_keep=logit_index,
        )
        return StepResult(logits, hidden)

    def self_check(self, checks: SelfChecks) -> str:
        return checks.decoding(self)

    @torch.inference_mode()
    def reference_logprobs(self, model: PreTrainedModel, check: CheckRow, new_ids: list[int]) -> torch.Tensor:
        """The row's tokens in one uncached forward, virtual tokens as input embeddings first, eager attention."""
        token_ids = check.input_ids + new_ids[:-1]
        embeds = model.get_input_embeddings()(torch.tensor([token_ids], device=model.device))  # [1, T, H]
        if check.virtual_embeds is not None:
            embeds = torch.cat([check.virtual_embeds[None].to(embeds.dtype), embeds], dim=1)  # [1, P + T, H]
        positions = torch.arange(embeds.shape[1], device=model.device)[None]
        with reference_attention(model):
            logits = model(inputs_embeds=embeds, position_ids=positions, use_cache=False).logits  # type: ignore[operator]
        return torch.log_softmax(logits[0].float(), dim=-1)[-len(new_ids) :]
