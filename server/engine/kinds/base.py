"""What differs between backbone kinds, behind one interface: a row's own tokens and their positions, the step's pass
through the model, intake's limits and refusals, the routes served and the start-up self-check's reference.

The defaults are a causal LM's: a row's own tokens are its embedded virtual tokens, its input, then a scored
candidate's or its output, one stream attended causally. An implementation overrides what its kind does otherwise.
The engine's core (scheduler, KV memory, step loop, output) asks the kind object, never which kind it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from prompt_store.types import SEQ_CLS, BackboneFingerprint, TaskArtifact
from server.engine.errors import InputTooLong, WrongKind
from server.engine.heads import BareHead, Head, build_head
from server.engine.types import KindName

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from server.engine.backbone import Backbone
    from server.engine.model_runner import ModelRunner
    from server.engine.readout import Readout
    from server.engine.request import Sequence
    from server.engine.scheduler import Chunk
    from server.engine.selfcheck import CheckRow

GENERATION_ROUTES = ("/v1/generate", "/v1/generate_stream", "/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True, slots=True)
class StepResult:
    logits: torch.Tensor | None  # [K, V] float32, the readout's logit positions in order (None: an encoder)
    hidden: torch.Tensor | None  # [M, H], the readout's hidden positions in order


DecoderPrefix = tuple[list[torch.Tensor], list[torch.Tensor]]  # per decoder layer [kv_heads, P, head_dim]


@dataclass(frozen=True, slots=True)
class PrefixCheck:
    """The self-check's prefix task: its rows as PEFT saves them, and what the reference forward reads instead."""

    saved: torch.Tensor  # [P, L * 2 * kv_dim]
    virtual_embeds: torch.Tensor | None  # [P, H] read before the input, whose keys and values the rows hold
    decoder_prefix: DecoderPrefix | None = None  # or the keys and values themselves, in the decoder's cache


class SelfChecks(Protocol):
    """The start-up self-check's two ways (selfcheck.py); a kind picks the one that fits what it answers."""

    generator: torch.Generator
    num_virtual_tokens: int

    @property
    def backbone(self) -> Backbone: ...

    def decoding(self, kind: ModelKind) -> str:
        """New tokens through the engine, each against the kind's reference log-probabilities."""
        ...

    def hidden_states(self, kind: ModelKind) -> str:
        """Final hidden states through the runner, against the kind's reference forward."""
        ...

    def prefix_from_embeddings(self) -> PrefixCheck:
        """A prefix whose keys and values are those random vocabulary embeddings leave in the backbone."""
        ...


class ModelKind(ABC):
    """One backbone kind: a causal LM, an encoder-decoder (T5, BART) or an encoder (BERT, RoBERTa, ...)."""

    name: ClassVar[KindName]  # as /info's model_kind says it
    first_position: int = 0  # a row's first position id (RoBERTa counts from padding_idx + 1)
    computes_rows_whole: ClassVar[bool] = False  # each row in one step, its tokens seeing each other
    special_tokens_in_targets: ClassVar[bool] = False  # a scored candidate tokenized as a training target
    continues_input: ClassVar[bool] = True  # generated text continues the input's (detokenized with it)
    head_types: ClassVar[tuple[str, ...]] = (SEQ_CLS,)  # classification task types its heads can serve
    generation_routes: ClassVar[tuple[str, ...]] = (*GENERATION_ROUTES, "/v1/score")

    @property
    def generates(self) -> bool:
        """It answers new tokens (the generation routes and /v1/score)."""
        return bool(self.generation_routes)

    # ---- a row's own tokens: those with keys and values in its blocks, in position order

    def num_embedded_tokens(self, row: Sequence) -> int:
        """Virtual tokens the row feeds itself as input embeddings (a prompt task not held as keys and values)."""
        return 0 if row.has_kv_prefix else row.num_virtual_tokens

    def num_own_tokens(self, row: Sequence) -> int:
        """Its virtual, input, fed candidate and output tokens."""
        fed = row.num_fed_targets + len(row.output_ids)
        return row.num_embedded_tokens + row.request.num_input_tokens + fed

    def max_own_tokens(self, row: Sequence, max_new_tokens: int) -> int:
        """The most slots the row can need: embedded virtual, input and every new token."""
        return row.num_embedded_tokens + row.request.num_input_tokens + row.num_fed_targets + max_new_tokens

    def own_token_ids(self, row: Sequence, start: int, num_tokens: int) -> list[int]:
        """Ids of the row's own tokens start..start+num_tokens (0 for embedded virtual tokens: the task supplies
        them)."""
        embedded, inputs = row.num_embedded_tokens, row.request.input_ids + row.fed_targets
        ids = [0] * max(0, min(embedded, start + num_tokens) - start)
        first = max(start - embedded, 0)
        last = max(start + num_tokens - embedded, 0)  # a chunk may end among the embedded virtual tokens
        ids += inputs[first:last]
        if last > len(inputs):
            ids += row.output_ids[max(first - len(inputs), 0) : last - len(inputs)]
        return ids

    def encoder_length(self, row: Sequence) -> int:
        """Tokens an encoder pass computes for the row when it starts (in the step's budget and its own slots)."""
        return 0

    def scored_from(self, row: Sequence) -> int:
        """The own token whose logits give a scored candidate's first log-probability: the input's last."""
        return row.num_embedded_tokens + row.request.num_input_tokens - 1

    def sequence_head_token(self, row: Sequence) -> int:
        """The own token a sequence classification head reads: the last, as a causal LM's head does."""
        return self.num_own_tokens(row) - 1

    def has_kv_prefix(self, task: TaskArtifact | None, prompts_as_kv: bool) -> bool:
        """Whether the task enters the row as its shared keys and values: a prefix always, a prompt task when the
        engine holds prompts that way (see task_cache); LoRA and IA3 tasks have no virtual tokens."""
        if task is None or not task.record.method.is_prompt_learning:
            return False
        return task.record.method.is_prefix or prompts_as_kv

    # ---- intake: limits and refusals

    def new_token_room(self, max_positions: int, asked: int, num_input: int, tasks: list[TaskArtifact | None]) -> int:
        """New tokens the positions leave after the longest task's virtual tokens and the input."""
        num_virtual = max((task.record.num_virtual_tokens for task in tasks if task), default=0)
        room = max_positions - num_virtual - num_input
        if room < 1:
            raise InputTooLong(
                f"expected at most {max_positions - num_virtual - 1} input tokens (the backbone's {max_positions} "
                f"positions less {num_virtual} virtual tokens and 1 new token); found {num_input}"
            )
        return room

    def positions_taken(self, num_input: int, tasks: list[TaskArtifact | None]) -> str:
        """What takes the positions before the new tokens, in words (for a refusal of more new tokens than fit)."""
        num_virtual = max((task.record.num_virtual_tokens for task in tasks if task), default=0)
        return f"the {num_input} input tokens and {num_virtual} virtual tokens"

    def scored_lengths(self, num_input: int, num_targets: int) -> tuple[int, ...]:
        """Tokens of a scoring row that must fit the positions: the input followed by the candidate."""
        return (num_input + num_targets,)

    def check_generation(self, what: str, model_id: str) -> None:
        """Generation (of text, of chat completions, of a candidate's log-probability) is served: nothing to refuse."""
        return None

    def check_prompt_tokens(self, what: str, model_id: str) -> None:
        """A prompt read as the row's own tokens (prompt_embeds, prompt log-probabilities): a causal LM's only."""
        raise WrongKind(f"expected a causal backbone for {what}; this server's backbone ({model_id}) is {self.name}")

    # ---- loading

    def num_pool_layers(self, fingerprint: BackboneFingerprint) -> int:
        """Layers of keys and values the KV pool holds."""
        return fingerprint.num_layers

    def heads(
        self, config: PretrainedConfig, model: PreTrainedModel, missing: set[str], loaded_type: str
    ) -> tuple[dict[str, Head], BareHead | None]:
        """The classification heads served (task type -> head), and the checkpoint's own trained one."""
        heads = {t: head for t in self.head_types if (head := build_head(config, t, model, missing)) is not None}
        return heads, None

    def takes_prefix(self) -> bool:
        """Whether the engine's attention can hold a prefix task's keys and values for every layer."""
        return True

    def why_unserved(self, model: PreTrainedModel) -> str | None:
        """Why the engine cannot run this loaded model's attention (None: it can)."""
        return None

    # ---- the step

    def prompt_rows(self, chunks: list[Chunk]) -> list[Sequence]:
        """The rows whose prompt task's vectors this step feeds as input embeddings."""
        return [chunk.row for chunk in chunks if chunk.start < chunk.row.num_embedded_tokens and chunk.row.task]

    @abstractmethod
    def forward(self, runner: ModelRunner, chunks: list[Chunk], readout: Readout) -> StepResult:
        """Compute every chunk in one pass: the logits and hidden states the readout asks for."""

    # ---- the start-up self-check

    @abstractmethod
    def self_check(self, checks: SelfChecks) -> str:
        """Run the self-check that fits this kind; what passed, for the log."""

    def saved_prompt(self, prompt: torch.Tensor) -> torch.Tensor:
        """A prompt task's vectors [P, H] as PEFT saves them."""
        return prompt

    def check_prefix(self, checks: SelfChecks) -> PrefixCheck:
        """The self-check's prefix task."""
        return checks.prefix_from_embeddings()

    def reference_logprobs(self, model: PreTrainedModel, check: CheckRow, new_ids: list[int]) -> torch.Tensor:
        """[T, V]: the backbone's own log-probabilities at each of the T new tokens the engine chose."""
        raise NotImplementedError(f"a {self.name} backbone answers no tokens")

    def reference_hidden(
        self, model: PreTrainedModel, virtual_embeds: torch.Tensor | None, input_ids: list[int]
    ) -> torch.Tensor:
        """[T, H]: the backbone's own final hidden states of a row."""
        raise NotImplementedError(f"a {self.name} backbone's self-check compares its tokens")
