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

import contextlib
import importlib.metadata
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache, EncoderDecoderCache, PretrainedConfig

from prompt_store.materialize import decoder_prefix, join_prefix, split_prefix
from prompt_store.types import TOKEN_CLS, Method, TaskArtifact, TaskRecord
from server.engine import alibi
from server.engine.backbone import Backbone
from server.engine.engine import Engine
from server.engine.errors import EngineError
from server.engine.intake import decoder_start, single_row_request
from server.engine.kv_pool import slots_of
from server.engine.readout import Readout
from server.engine.request import Job, Request, Sequence
from server.engine.scheduler import Chunk
from server.engine.types import EngineOutput, SamplingParams

logger = logging.getLogger(__name__)

TEXT = "promptserve checks itself"
NUM_VIRTUAL_TOKENS = 4
NUM_NEW_TOKENS = 4
SEED = 1234
TASK_ID = "#self-check"  # the task-id pattern refuses it: never a user's task
REFERENCE_ATTENTION = "eager"


class SelfCheckFailed(EngineError):
    """The engine's tokens differ from the backbone's own on this backbone and these library versions."""


@dataclass(frozen=True, slots=True)
class CheckRow:
    name: str
    task: TaskArtifact | None
    virtual_embeds: torch.Tensor | None  # [P, H]: what the backbone reads before the input for this row
    input_ids: list[int] = field(default_factory=list)
    decoder_prefix: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # per layer [kv_heads, P, d]

    def on(self, input_ids: list[int]) -> CheckRow:
        return replace(self, name=f"{self.name} row ({len(input_ids)} input tokens)", input_ids=input_ids)


def self_check(engine: Engine) -> float:
    """Run the check on the engine (before its thread starts); returns its seconds, raises SelfCheckFailed."""
    started = time.perf_counter()
    backbone = engine.backbone
    if backbone.encoder is not None:
        check_encoder(engine, list(backbone.tokenizer(TEXT)["input_ids"]))
        logger.info("self-check passed on %s: plain and prompt rows in %.3f s", backbone.model_id,
                    time.perf_counter() - started)  # fmt: skip
        return time.perf_counter() - started
    rows = [row.on(input_ids) for input_ids in check_inputs(engine) for row in check_rows(engine)]
    try:
        outputs = run_through_engine(engine, rows)
    finally:
        engine.retire_task(TASK_ID + ".prompt", None)
        engine.retire_task(TASK_ID + ".prefix", None)
    for row in rows:
        compare(backbone, row, outputs[row.name])
    seconds = time.perf_counter() - started
    lengths = sorted({len(row.input_ids) for row in rows})
    logger.info("self-check passed on %s: %d rows (plain, prompt, prefix; inputs of %s tokens) in %.3f s",
                backbone.model_id, len(rows), ", ".join(map(str, lengths)), seconds)  # fmt: skip
    return seconds


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


def check_rows(engine: Engine) -> list[CheckRow]:
    backbone = engine.backbone
    generator = torch.Generator().manual_seed(SEED)
    prompt = vocabulary_embeds(backbone, generator)
    if backbone.seq2seq is not None:  # the prompt before the encoder's input (PEFT saves it twice: 2P rows)
        saved = torch.cat([prompt, prompt]).float().cpu()
        prefix, decoder_kv = saved_decoder_prefix(backbone, generator)
        return [
            CheckRow("plain", None, None),
            CheckRow("prompt", artifact(TASK_ID + ".prompt", Method.PROMPT_TUNING, saved), prompt),
            CheckRow("prefix", artifact(TASK_ID + ".prefix", Method.PREFIX_TUNING, prefix), None, [], decoder_kv),
        ]
    prefix_source = vocabulary_embeds(backbone, generator)
    prefix = join_prefix(*keys_and_values(engine, prefix_source)).float().cpu()  # [P, L * 2 * kv_dim], as PEFT saves
    return [
        CheckRow("plain", None, None),
        CheckRow("prompt", artifact(TASK_ID + ".prompt", Method.PROMPT_TUNING, prompt.float().cpu()), prompt),
        CheckRow("prefix", artifact(TASK_ID + ".prefix", Method.PREFIX_TUNING, prefix), prefix_source),
    ]


def vocabulary_embeds(backbone: Backbone, generator: torch.Generator) -> torch.Tensor:
    """[P, H]: the input embeddings of random vocabulary tokens (the sampled-vocabulary init of Lester et al.)."""
    token_ids = torch.randint(0, backbone.fingerprint.vocab_size, (NUM_VIRTUAL_TOKENS,), generator=generator)
    with torch.inference_mode():
        return backbone.model.get_input_embeddings()(token_ids.to(backbone.device))


def saved_decoder_prefix(
    backbone: Backbone, generator: torch.Generator
) -> tuple[torch.Tensor, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Random prefix rows for an encoder-decoder as PEFT saves them ([P, L*2*kv_dim], L the config's layers), and the
    keys and values each decoder layer's self-attention reads from them (per layer [kv_heads, P, head_dim])."""
    fingerprint = backbone.fingerprint
    width = fingerprint.num_layers * 2 * fingerprint.num_key_value_heads * fingerprint.head_dim
    saved = torch.randn((NUM_VIRTUAL_TOKENS, width), generator=generator)
    keys, values = split_prefix(saved.to(backbone.device, backbone.dtype), fingerprint)
    return saved, decoder_prefix(keys, values, fingerprint)


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
    """Every row at once, greedy, through the engine's own steps; each row's outputs."""
    outputs: dict[str, list[EngineOutput]] = {row.name: [] for row in rows}
    as_kv = engine.config.cache_prompt_kv
    for row in rows:
        sink = outputs[row.name].append
        request_id, start = f"self-check-{row.name}", decoder_start(engine.backbone)
        engine.add(single_row_request(request_id, row.input_ids, row.task, as_kv, NUM_NEW_TOKENS, sink, start))
    while engine.has_work():
        engine.step()
    return outputs


def compare(backbone: Backbone, row: CheckRow, outputs: list[EngineOutput]) -> None:
    errors = [output.error for output in outputs if output.error is not None]
    if errors or not outputs or not outputs[-1].finished:
        raise failure(backbone, f"the {row.name} failed in the engine: {errors[0] if errors else 'no end'!r}")
    tokens = [token for output in outputs for token in output.tokens]
    if backbone.seq2seq is not None:
        decoder_ids = [backbone.seq2seq.decoder_start_id, *(token.id for token in tokens[:-1])]
        expected = seq2seq_reference_logprobs(backbone, row, decoder_ids)
    else:
        logprobs = reference_logprobs(backbone, row, row.input_ids + [token.id for token in tokens[:-1]])
        expected = logprobs[-len(tokens) :]  # [N, V]: what the backbone gives at each position the engine chose at
    tolerance = tolerance_of(backbone.dtype)
    for step, (token, reference) in enumerate(zip(tokens, expected, strict=True)):
        chosen, best = float(reference[token.id]), float(reference.max())
        if chosen < best - tolerance or abs(token.logprob - chosen) > tolerance:
            raise failure(
                backbone,
                f"token {step + 1} of the {row.name} is {token.id} (log-probability {token.logprob:.4f}); the "
                f"backbone's uncached forward gives it {chosen:.4f}, and {int(reference.argmax())} {best:.4f} "
                f"(tolerance {tolerance:g})",
            )


@torch.inference_mode()
def reference_logprobs(backbone: Backbone, row: CheckRow, token_ids: list[int]) -> torch.Tensor:
    """[T, V] log-probabilities after each token of the row: virtual tokens as embeddings, eager attention."""
    model = backbone.model
    embeds = model.get_input_embeddings()(torch.tensor([token_ids], device=backbone.device))  # [1, T, H]
    if row.virtual_embeds is not None:
        embeds = torch.cat([row.virtual_embeds[None].to(embeds.dtype), embeds], dim=1)  # [1, P + T, H]
    positions = torch.arange(embeds.shape[1], device=backbone.device)[None]
    with stock_attention(model):
        logits = model(inputs_embeds=embeds, position_ids=positions, use_cache=False).logits  # type: ignore[operator]
    return torch.log_softmax(logits[0].float(), dim=-1)


@torch.inference_mode()
def seq2seq_reference_logprobs(backbone: Backbone, row: CheckRow, decoder_ids: list[int]) -> torch.Tensor:
    """[T, V] after each decoder token: the virtual tokens before the encoder's input, a prefix's keys and values in
    the decoder's self-attention cache (as PEFT's forward puts them), eager attention."""
    model = backbone.model
    embed = model.get_input_embeddings()
    encoder_embeds = embed(torch.tensor([row.input_ids], device=backbone.device))  # [1, S, H]
    if row.virtual_embeds is not None:
        encoder_embeds = torch.cat([row.virtual_embeds[None].to(encoder_embeds.dtype), encoder_embeds], dim=1)
    decoder = torch.tensor([decoder_ids], device=backbone.device)
    cache = prefix_cache(row.decoder_prefix) if row.decoder_prefix is not None else None
    with stock_attention(model):
        logits = model(inputs_embeds=encoder_embeds, decoder_input_ids=decoder, cache=cache,  # type: ignore[operator]
                       use_cache=cache is not None).logits  # fmt: skip
    return torch.log_softmax(logits[0].float(), dim=-1)


def prefix_cache(prefix: tuple[list[torch.Tensor], list[torch.Tensor]]) -> EncoderDecoderCache:
    """A decoder self-attention cache holding a prefix's keys and values, an empty cross-attention one."""
    self_attention = DynamicCache()
    for layer, (keys, values) in enumerate(zip(*prefix, strict=True)):
        self_attention.update(keys[None], values[None], layer)  # [1, kv_heads, P, head_dim]
    return EncoderDecoderCache(self_attention, DynamicCache())


def check_encoder(engine: Engine, input_ids: list[int]) -> None:
    """A plain and a prompt row through the engine's runner in one pass; each row's hidden states against the
    backbone's own forward (stock eager attention, its own positions)."""
    backbone = engine.backbone
    prompt = vocabulary_embeds(backbone, torch.Generator().manual_seed(SEED))
    task = artifact(TASK_ID + ".prompt", Method.PROMPT_TUNING, prompt.float().cpu())
    rows = [CheckRow("plain", None, None), CheckRow("prompt", task, prompt)]
    hidden = encoder_hidden(engine, input_ids, rows)
    tolerance = tolerance_of(backbone.dtype)
    for row, got in zip(rows, hidden, strict=True):
        expected = encoder_reference(backbone, row, input_ids)
        error = float((got.float() - expected).abs().max())
        if error > tolerance * max(1.0, float(expected.abs().max())):
            raise failure(
                backbone, f"the {row.name} row's hidden states differ from the backbone's by up to {error:.2e}"
            )


def encoder_hidden(engine: Engine, input_ids: list[int], rows: list[CheckRow]) -> list[torch.Tensor]:
    """Each row's final hidden states [T, H], all rows in one pass of the engine's runner."""
    request = Request("self-check", input_ids, SamplingParams(max_new_tokens=1), 0, lambda _: None,
                      job=Job.CLASSIFY, bidirectional=True, head_type=TOKEN_CLS)  # fmt: skip
    request.rows = [Sequence(request, row.task, i) for i, row in enumerate(rows)]
    chunks = [Chunk(row, row.num_own_tokens) for row in request.rows]
    for row in request.rows:
        row.block_ids = engine.memory.allocate(engine.memory.blocks_for(row.num_own_tokens))
    try:
        total = sum(chunk.num_tokens for chunk in chunks)
        result = engine.runner.run(chunks, Readout(hidden_index=list(range(total))))
    finally:
        for row in request.rows:
            engine.memory.release(row.block_ids)
        engine.retire_task(TASK_ID + ".prompt", None)
    assert result.hidden is not None
    return list(result.hidden.split([chunk.num_tokens for chunk in chunks]))


@torch.inference_mode()
def encoder_reference(backbone: Backbone, row: CheckRow, input_ids: list[int]) -> torch.Tensor:
    """[T, H]: the encoder's own forward of the row (virtual tokens as input embeddings first), eager attention."""
    model = backbone.model
    embeds = model.get_input_embeddings()(torch.tensor([input_ids], device=backbone.device))
    if row.virtual_embeds is not None:
        embeds = torch.cat([row.virtual_embeds[None].to(embeds.dtype), embeds], dim=1)
    packed = backbone.encoder is not None and backbone.encoder.packed
    with stock_attention(model) if packed else contextlib.nullcontext():  # DeBERTa-v2's attention is its own
        hidden = model.base_model(inputs_embeds=embeds)[0]  # type: ignore[operator]
    return hidden[0].float()


@contextlib.contextmanager
def stock_attention(model: torch.nn.Module) -> Iterator[None]:
    """transformers' own eager attention for the reference forward (a family the engine wraps: the attention PEFT's
    forward runs it with), the engine's again after it."""
    config: PretrainedConfig = model.config  # type: ignore[assignment]
    model.set_attn_implementation(alibi.stock_attention(config) or REFERENCE_ATTENTION)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_attn_implementation(alibi.engine_attention(config))  # type: ignore[operator]


def tolerance_of(dtype: torch.dtype) -> float:
    """Log-probability slack for two correct attentions' rounding: 1e-3 in float32, 32 ulps in half precision."""
    return max(1e-3, 32 * torch.finfo(dtype).eps)


def failure(backbone: Backbone, detail: str) -> SelfCheckFailed:
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("transformers", "torch"))
    return SelfCheckFailed(
        f"self-check failed on backbone {backbone.model_id!r} ({backbone.fingerprint.model_type}, "
        f"{str(backbone.dtype).removeprefix('torch.')}, {backbone.device}) with {versions}: {detail}. The engine would "
        "not answer as this backbone does; try the versions in requirements.lock, or report it. "
        "PROMPTSERVE_SELF_CHECK=false skips this check."
    )
