"""The start-up self-check: before the server reports ready, the engine must decode like the backbone itself.

A plain row, a prompt row and a prefix row (random virtual tokens: embeddings of random vocabulary tokens, and the
keys and values such embeddings leave), each on inputs of several lengths (two tokens, a sentence, several blocks),
run together through the engine, greedy. The backbone then reads the same tokens in one uncached forward with its
stock eager attention, the virtual tokens given as input embeddings. Each token the engine chose must be the
backbone's greedy choice too, and have the same log-probability, up to the dtype's rounding. A backbone the engine
cannot serve exactly fails here, by name, instead of answering wrongly.

An encoder-decoder's prompt goes before the encoder's input; its prefix row's keys and values (random) sit in the
decoder's self-attention, read by the reference from a transformers cache as PEFT's forward puts them, so decoder
positions start after them. An encoder answers no tokens: its plain and prompt rows' final hidden states, which
every classification head reads, must equal the backbone's own forward's.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import time
from dataclasses import dataclass, field, replace

import torch

from prompt_store.materialize import join_prefix
from prompt_store.types import TOKEN_CLS, Method, TaskArtifact, TaskRecord
from server.engine.attention import num_layers
from server.engine.backbone import Backbone
from server.engine.engine import Engine
from server.engine.errors import EngineError, UnservableTarget
from server.engine.intake import single_row_request
from server.engine.kinds.base import DecoderPrefix, ModelKind, PrefixCheck
from server.engine.kv_pool import slots_of
from server.engine.readout import Readout
from server.engine.request import Job, Request, Sequence
from server.engine.scheduler import Chunk
from server.engine.selfcheck_modules import module_tasks, reference_deltas, warn_unservable
from server.engine.types import EngineOutput, SamplingParams

logger = logging.getLogger(__name__)

TEXT = "promptserve checks itself"
NUM_VIRTUAL_TOKENS = 4
NUM_NEW_TOKENS = 4
SEED = 1234
MEASURED_LAYERS = 32  # the deepest backbone the half-precision tolerance was measured on
TASK_ID = "#self-check"  # the task-id pattern refuses it: never a user's task


class SelfCheckFailed(EngineError):
    """The engine's tokens differ from the backbone's own on this backbone and these library versions."""


@dataclass(frozen=True, slots=True)
class CheckRow:
    name: str
    task: TaskArtifact | None
    virtual_embeds: torch.Tensor | None  # [P, H]: what the backbone reads before the input for this row
    input_ids: list[int] = field(default_factory=list)
    decoder_prefix: DecoderPrefix | None = None  # per layer [kv_heads, P, d]

    def on(self, input_ids: list[int]) -> CheckRow:
        return replace(self, name=f"{self.name} row ({len(input_ids)} input tokens)", input_ids=input_ids)


def self_check(engine: Engine) -> float:
    """Run the check on the engine (before its thread starts); returns its seconds, raises SelfCheckFailed."""
    started = time.perf_counter()
    passed = engine.backbone.kind.self_check(Checks(engine))
    seconds = time.perf_counter() - started
    logger.info("self-check passed on %s: %s in %.3f s", engine.backbone.model_id, passed, seconds)
    return seconds


@dataclass
class Checks:
    """The self-check's two ways on this engine (the kind picks one: `SelfChecks`)."""

    engine: Engine
    generator: torch.Generator = field(default_factory=torch.Generator)
    num_virtual_tokens: int = NUM_VIRTUAL_TOKENS

    @property
    def backbone(self) -> Backbone:
        return self.engine.backbone

    def decoding(self, kind: ModelKind) -> str:
        """A plain, a prompt and a prefix row on each check input, and a LoRA and an IA3 row on the sentence, through
        the engine's steps together, greedy."""
        inputs = check_inputs(self.engine)
        rows = [row.on(input_ids) for input_ids in inputs for row in check_rows(self, kind)]
        modules = self.module_rows(inputs[1])
        try:
            outputs = run_through_engine(self.engine, rows + modules)
            for _ in self.backbone.modules:  # each run without the modules the one before found it cannot adapt
                if not any(isinstance(o.error, UnservableTarget) for row in modules for o in outputs[row.name]):
                    break
                self.retire_module_tasks()
                modules = self.module_rows(inputs[1])
                outputs.update(run_through_engine(self.engine, modules))
        finally:
            for task in ("prompt", "prefix"):
                self.engine.retire_task(f"{TASK_ID}.{task}", None)
            self.retire_module_tasks()
        warn_unservable(self.backbone, self.engine.tasks.adapters.hooks.unservable)
        for row in rows + modules:
            compare(self.backbone, row, outputs[row.name])
        lengths = ", ".join(map(str, sorted({len(row.input_ids) for row in rows})))
        return f"{len(rows) + len(modules)} rows (plain, prompt, prefix; inputs of {lengths} tokens; LoRA, IA3)"

    def hidden_states(self, kind: ModelKind) -> str:
        check_encoder(self, list(self.backbone.tokenizer(TEXT)["input_ids"]))
        warn_unservable(self.backbone, self.engine.tasks.adapters.hooks.unservable)
        return "plain, prompt, LoRA and IA3 rows"

    def module_rows(self, input_ids: list[int]) -> list[CheckRow]:
        """A LoRA and an IA3 row, their tasks on every linear layer of the shared pass the engine can adapt."""
        unservable = set(self.engine.tasks.adapters.hooks.unservable)
        tasks = module_tasks(self.backbone, TASK_ID, unservable, SEED)
        return [CheckRow(task.record.method.value, task, None).on(input_ids) for task in tasks]

    def retire_module_tasks(self) -> None:
        for method in (Method.LORA, Method.IA3):
            self.engine.retire_task(f"{TASK_ID}.{method.value}", None)

    def prefix_from_embeddings(self) -> PrefixCheck:
        """Random vocabulary embeddings, and the keys and values they leave as PEFT saves a prefix."""
        source = vocabulary_embeds(self.backbone, self.generator)
        saved = join_prefix(*keys_and_values(self.engine, source)).float().cpu()  # [P, L * 2 * kv_dim]
        return PrefixCheck(saved, source)


def check_inputs(engine: Engine) -> list[list[int]]:
    """Two tokens (where a short input's positions, biases and padding show), a sentence, and one over several KV
    blocks, as long as one row of it fits the pool and the backbone's positions."""
    backbone, block_size = engine.backbone, engine.pool.block_size
    sentence = list(backbone.tokenizer(TEXT)["input_ids"])
    longer = list(backbone.tokenizer(" ".join([TEXT] * 4))["input_ids"])
    room = (engine.memory.num_blocks - 1) * block_size - NUM_VIRTUAL_TOKENS - NUM_NEW_TOKENS
    if backbone.max_positions is not None:
        room = min(room, backbone.max_positions - NUM_VIRTUAL_TOKENS - NUM_NEW_TOKENS)
    inputs = [sentence[:2], sentence]
    return [*inputs, longer[:room]] if room > len(sentence) else inputs


def check_rows(checks: Checks, kind: ModelKind) -> list[CheckRow]:
    """The prompt task's vectors are random vocabulary embeddings; the prefix task is the kind's."""
    checks.generator.manual_seed(SEED)
    prompt = vocabulary_embeds(checks.backbone, checks.generator)
    prefix = kind.check_prefix(checks)
    prompt_task = artifact(TASK_ID + ".prompt", Method.PROMPT_TUNING, kind.saved_prompt(prompt).float().cpu())
    prefix_task = artifact(TASK_ID + ".prefix", Method.PREFIX_TUNING, prefix.saved)
    return [
        CheckRow("plain", None, None),
        CheckRow("prompt", prompt_task, prompt),
        CheckRow("prefix", prefix_task, prefix.virtual_embeds, [], prefix.decoder_prefix),
    ]


def vocabulary_embeds(backbone: Backbone, generator: torch.Generator) -> torch.Tensor:
    """[P, H]: the input embeddings of random vocabulary tokens (the sampled-vocabulary init of Lester et al.)."""
    token_ids = torch.randint(0, backbone.fingerprint.vocab_size, (NUM_VIRTUAL_TOKENS,), generator=generator)
    with torch.inference_mode():
        return backbone.model.get_input_embeddings()(token_ids.to(backbone.device))


def keys_and_values(engine: Engine, embeds: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer [kv_heads, P, head_dim]: what these input embeddings [P, H] leave, computed in spare pool blocks."""
    memory, pool = engine.memory, engine.pool
    block_ids = memory.allocate(memory.blocks_for(embeds.shape[0]))
    try:
        slots = slots_of(block_ids, embeds.shape[0], pool.block_size).to(engine.backbone.device)
        engine.tasks.compute_prompt_kv(embeds, slots)
        keys = [layer[slots].transpose(0, 1).clone() for layer in pool.keys]
        values = [layer[slots].transpose(0, 1).clone() for layer in pool.values]
    finally:
        memory.release(block_ids)
    return keys, values


def artifact(task_id: str, method: Method, prompt_embeddings: torch.Tensor) -> TaskArtifact:
    record = TaskRecord(task_id, 0, method, NUM_VIRTUAL_TOKENS, bytes=0, sha256="", created_at="")
    return TaskArtifact(record, {}, prompt_embeddings)


def run_through_engine(engine: Engine, rows: list[CheckRow]) -> dict[str, list[EngineOutput]]:
    """Every row at once, greedy, through the engine's own steps; each row's outputs. The rows are the engine's own
    requests, as a registration's probe is: a max_waiting smaller than their number does not refuse them."""
    outputs: dict[str, list[EngineOutput]] = {row.name: [] for row in rows}
    as_kv = engine.config.cache_prompt_kv
    for row in rows:
        sink = outputs[row.name].append
        request_id, kind = f"self-check-{row.name}", engine.backbone.kind
        engine.probe(single_row_request(request_id, row.input_ids, row.task, as_kv, NUM_NEW_TOKENS, sink, kind))
    while engine.has_work():
        engine.step()
    return outputs


def compare(backbone: Backbone, row: CheckRow, outputs: list[EngineOutput]) -> None:
    errors = [output.error for output in outputs if output.error is not None]
    if errors or not outputs or not outputs[-1].finished:
        raise failure(backbone, f"the {row.name} failed in the engine: {errors[0] if errors else 'no end'!r}")
    tokens = [token for output in outputs for token in output.tokens]
    new_ids = [token.id for token in tokens]
    with reference_deltas(backbone, row.task):
        expected = backbone.kind.reference_logprobs(backbone.model, row, new_ids)  # [N, V] at each token chosen
    tolerance = tolerance_of(backbone.dtype, num_layers(backbone.model))
    for step, (token, reference) in enumerate(zip(tokens, expected, strict=True)):
        chosen, best = float(reference[token.id]), float(reference.max())
        if chosen < best - tolerance or abs(token.logprob - chosen) > tolerance:
            raise failure(
                backbone,
                f"token {step + 1} of the {row.name} is {token.id} (log-probability {token.logprob:.4f}); the "
                f"backbone's uncached forward gives it {chosen:.4f}, and {int(reference.argmax())} {best:.4f} "
                f"(tolerance {tolerance:g})",
            )


def check_encoder(checks: Checks, input_ids: list[int]) -> None:
    """A plain, a prompt, a LoRA and an IA3 row through the engine's runner in one pass (again without any module
    the pass found it cannot adapt); each row's hidden states against the backbone's own forward (stock eager
    attention, its own positions)."""
    engine, backbone = checks.engine, checks.backbone
    prompt = vocabulary_embeds(backbone, torch.Generator().manual_seed(SEED))
    task = artifact(TASK_ID + ".prompt", Method.PROMPT_TUNING, prompt.float().cpu())
    for _ in range(len(backbone.modules) + 1):
        rows = [CheckRow("plain", None, None), CheckRow("prompt", task, prompt), *checks.module_rows(input_ids)]
        try:
            hidden = encoder_hidden(engine, input_ids, rows)
            break
        except UnservableTarget as unservable:
            engine.tasks.adapters.hooks.unservable[unservable.module] = unservable.found
        finally:
            checks.retire_module_tasks()
    else:
        raise failure(backbone, "the LoRA and IA3 rows found a module the engine cannot adapt in every pass")
    tolerance = tolerance_of(backbone.dtype, num_layers(backbone.model))
    for row, got in zip(rows, hidden, strict=True):
        with reference_deltas(backbone, row.task):
            expected = backbone.kind.reference_hidden(backbone.model, row.virtual_embeds, input_ids)
        error = float((got.float() - expected).abs().max())
        if error > tolerance * max(1.0, float(expected.abs().max())):
            raise failure(
                backbone, f"the {row.name} row's hidden states differ from the backbone's by up to {error:.2e}"
            )


def encoder_hidden(engine: Engine, input_ids: list[int], rows: list[CheckRow]) -> list[torch.Tensor]:
    """Each row's final hidden states [T, H], all rows in one pass of the engine's runner."""
    request = Request("self-check", input_ids, SamplingParams(max_new_tokens=1), 0, lambda _: None,
                      kind=engine.backbone.kind, job=Job.CLASSIFY, head_type=TOKEN_CLS)  # fmt: skip
    request.rows = [Sequence(request, row.task, i) for i, row in enumerate(rows)]
    chunks = [Chunk(row, row.num_own_tokens) for row in request.rows]
    for row in request.rows:
        row.block_ids = engine.memory.allocate(engine.memory.blocks_for(row.num_own_tokens))
    adapted = [row for row in request.rows if row.applies_adapter and row.task is not None]
    try:
        for row in adapted:  # as the scheduler and the step's start do
            engine.scheduler.adapters.hold(row.task.key)  # type: ignore[union-attr]
            row.holds_adapter = True
            engine.tasks.adapter_of(row.task)  # type: ignore[arg-type]
        total = sum(chunk.num_tokens for chunk in chunks)
        result = engine.runner.run(chunks, Readout(hidden_index=list(range(total))))
    finally:
        for row in request.rows:
            engine.memory.release(row.block_ids)
        for row in [row for row in adapted if row.holds_adapter]:
            engine.scheduler.adapters.release(row.task.key)  # type: ignore[union-attr]
            row.holds_adapter = False
        engine.retire_task(TASK_ID + ".prompt", None)
    assert result.hidden is not None
    return list(result.hidden.split([chunk.num_tokens for chunk in chunks]))


def tolerance_of(dtype: torch.dtype, num_layers: int = MEASURED_LAYERS) -> float:
    """Log-probability slack for two correct attentions' rounding: 1e-3 in float32, 32 ulps in half precision up to
    32 layers (0.25 nats in bfloat16), growing as the square root of the depth beyond. Measured on random 4- to
    32-layer Llamas and GPT-2s in CPU bfloat16 (`python -m benchmarks.bf16_tolerance`): both gaps the check holds to
    it at most 0.17 nats (21 ulps) at 32 layers, 0.13 at 16 and 0.04 at 4, so 32 ulps leaves a 1.5x margin where
    measured, and the depth's growth (about the square root) carries it to deeper models."""
    depth = max(1.0, math.sqrt(num_layers / MEASURED_LAYERS))
    return max(1e-3, 32 * torch.finfo(dtype).eps * depth)


def failure(backbone: Backbone, detail: str) -> SelfCheckFailed:
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("transformers", "torch"))
    return SelfCheckFailed(
        f"self-check failed on backbone {backbone.model_id!r} ({backbone.fingerprint.model_type}, "
        f"{str(backbone.dtype).removeprefix('torch.')}, {backbone.device}) with {versions}: {detail}. The engine would "
        "not answer as this backbone does; try the versions in requirements.lock, or report it. "
        "PROMPTSERVE_SELF_CHECK=false skips this check."
    )
