"""The KV pool sized by a measurement, as vLLM sizes its cache: after the weights load and before the pool exists, one
dummy step at the worst case the configuration allows runs through the model and the readout, and the peak memory it
took above the weights is kept free; the pool takes `kv_cache_memory_fraction` of what is left.

The worst step: `max_batch_tokens` tokens as decode rows at the longest row's keys, one starting row with the
largest encoder input (an encoder-decoder's encoder runs in the step that starts a row), and prefill chunks at the
ends of rows as long as a row can be; every position read out as logits (the largest scoring readout) and hidden
states, the rows sampled with top-p over the whole vocabulary and top log-probabilities, every position scored.
Attention pads its rows to at most the `TileLimits` this step reaches, so no later step's attention is larger than
the one measured. The memory probe is injectable: CUDA's allocator statistics on a GPU, a fake in the CPU tests.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from server.engine.attention import TileLimits
from server.engine.backbone import Backbone
from server.engine.config import EngineConfig, default_max_batch_tokens
from server.engine.kv_memory import KVMemory
from server.engine.kv_pool import CPU_DEFAULT_BYTES, KVPool
from server.engine.model_runner import ModelRunner
from server.engine.readout import Readout
from server.engine.request import Request, Sequence
from server.engine.sampler import MAX_TOP_LOGPROBS, draws, sample, score
from server.engine.scheduler import Chunk
from server.engine.task_cache import TaskCache
from server.engine.types import SamplingParams

logger = logging.getLogger(__name__)

MAX_TILE_PAIRS = 1 << 24  # query-key pairs one attention call pads to, at most
MAX_TILE_KEYS = 1 << 18  # key slots one attention call gathers, at most
DUMMY_TOKEN = 0
# top-p without top-k: the filter's widest path, the whole vocabulary ranked (a top-k ranks only its k best)
WORST_SAMPLING = SamplingParams(do_sample=True, temperature=0.7, top_k=0, top_p=0.9, top_logprobs=MAX_TOP_LOGPROBS)


class MemoryProbe(Protocol):
    """What the profile reads of the device's memory."""

    def free_bytes(self) -> int:
        """Free on the device now (after `release_cached`: what torch's allocator does not hold either)."""
        ...

    def allocated_bytes(self) -> int:
        """Held by live tensors now."""
        ...

    def start_peak(self) -> None:
        """The peak starts again from what is allocated now."""
        ...

    def peak_bytes(self) -> int:
        """The most allocated at once since `start_peak`."""
        ...

    def release_cached(self) -> None:
        """Give memory torch's allocator caches but no tensor holds back to the device."""
        ...


@dataclass(frozen=True, slots=True)
class CudaProbe:
    device: torch.device

    def free_bytes(self) -> int:
        return int(torch.cuda.mem_get_info(self.device)[0])

    def allocated_bytes(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def start_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def release_cached(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()


def probe_for(device: torch.device) -> MemoryProbe | None:
    """The device's probe (None: a CPU, whose pool has a fixed default size and whose memory is not profiled)."""
    return CudaProbe(device) if device.type == "cuda" else None


@dataclass(frozen=True, slots=True)
class WorstStep:
    """The largest step the configuration allows: `num_decode_rows` rows of one token at `max_row_tokens` keys,
    a starting row whose encoder input is `encoder_tokens` long, and the rest of the step's tokens as `prefill`
    chunks, each at the end of a row of `max_row_tokens` (whole rows, for a kind whose rows are computed whole: no
    decode or starting row then)."""

    num_decode_rows: int
    prefill: tuple[int, ...]  # tokens of each prefill chunk
    max_row_tokens: int
    encoder_tokens: int
    rows_whole: bool

    @classmethod
    def of(cls, config: EngineConfig, backbone: Backbone) -> WorstStep:
        step_tokens = config.max_batch_tokens or default_max_batch_tokens(backbone.device.type)
        longest = config.max_virtual_tokens + config.max_input_tokens + config.max_new_tokens_limit
        max_row = min(longest, backbone.position_room or longest)
        encoder = min(config.max_virtual_tokens + config.max_input_tokens, max_row)
        whole = backbone.kind.computes_rows_whole
        decode = 0 if whole else max(0, min(config.max_batch_size - 2, step_tokens // 2 - 1))  # half stays prefill
        full, rest = divmod(max(1, step_tokens - decode - (0 if whole else 1)), max_row)
        return cls(decode, (max_row,) * full + ((rest,) if rest else ()), max_row, encoder, whole)

    @property
    def limits(self) -> TileLimits:
        """What this step's attention reaches, at most the fixed caps: no step pads one attention call further."""
        prefill_keys = len(self.prefill) * (max(self.prefill) if self.rows_whole else self.max_row_tokens)
        one_token_keys = 0 if self.rows_whole else (self.num_decode_rows + 1) * self.max_row_tokens  # + starting
        return TileLimits(
            pairs=min(MAX_TILE_PAIRS, max(self.prefill) * prefill_keys),
            keys=min(MAX_TILE_KEYS, max(one_token_keys, prefill_keys)),
        )

    @property
    def num_slots(self) -> int:
        """Slots its rows read and write: they all share one row's blocks, the longest's (what they hold does not
        matter)."""
        return max(self.max_row_tokens, self.encoder_tokens)

    def chunks(self, backbone: Backbone, block_ids: list[int]) -> list[Chunk]:
        if self.rows_whole:
            return [self.chunk(backbone, block_ids, n, n, n, starts=True) for n in self.prefill]
        longest, encoder = self.max_row_tokens, self.encoder_tokens
        decode = [self.chunk(backbone, block_ids, longest, 1, encoder) for _ in range(self.num_decode_rows)]
        starting = self.chunk(backbone, block_ids, 1, 1, encoder, starts=True)
        return [*decode, starting, *(self.chunk(backbone, block_ids, longest, n, encoder) for n in self.prefill)]

    def chunk(
        self, backbone: Backbone, block_ids: list[int], own_tokens: int, num_tokens: int, num_input: int,
        starts: bool = False,
    ) -> Chunk:  # fmt: skip
        """`num_tokens` of a bare row of `own_tokens` whose input is `num_input` tokens: its last, or its first
        (`starts`: the step that starts a row runs its encoder input)."""
        request = Request(
            "memory-profile", [DUMMY_TOKEN] * max(1, num_input), WORST_SAMPLING, 1, lambda _: None, kind=backbone.kind
        )
        row = Sequence(request, None, block_ids=block_ids)
        request.rows.append(row)
        row.output_ids = [DUMMY_TOKEN] * max(0, own_tokens - row.num_own_tokens)
        row.num_computed = 0 if starts else row.num_own_tokens - num_tokens
        return Chunk(row, num_tokens)


@dataclass(frozen=True, slots=True)
class MemoryProfile:
    weights_bytes: int  # held before the profile: the model's weights and buffers
    activation_bytes: int  # the worst step's peak above what was held when it started
    free_bytes: int  # free on the device after the profile, its memory released

    def pool_budget(self, fraction: float, reserved: int) -> int:
        """`fraction` of what the worst step's activations leave of the free memory, less `reserved` (the device
        caches that fill later: prompt embeddings, LoRA / IA3 weights)."""
        return max(0, int(max(0, self.free_bytes - self.activation_bytes) * fraction) - reserved)


@torch.inference_mode()
def profile_memory(backbone: Backbone, step: WorstStep, probe: MemoryProbe, num_pool_layers: int,
                   block_size: int) -> MemoryProfile:  # fmt: skip
    """Run the worst step over a scratch pool of its own and measure its peak; everything it made is freed."""
    weights = probe.allocated_bytes()
    num_blocks = -(-step.num_slots // block_size)
    fp, dtype, device = backbone.fingerprint, backbone.dtype, backbone.device
    scratch = KVPool.allocate(fp, num_pool_layers, num_blocks + 1, block_size, dtype, device)  # + block 0
    memory = KVMemory(num_blocks, block_size)
    runner = ModelRunner(backbone, scratch, TaskCache(backbone, scratch, memory, 0), step.limits)
    chunks = step.chunks(backbone, list(range(1, num_blocks + 1)))
    probe.start_peak()
    held = probe.allocated_bytes()
    run_worst_step(runner, chunks, backbone)
    activations = probe.peak_bytes() - held
    del runner, scratch, memory, chunks
    probe.release_cached()
    return MemoryProfile(weights, activations, probe.free_bytes())


def run_worst_step(runner: ModelRunner, chunks: list[Chunk], backbone: Backbone) -> None:
    """The pass with every position read out, then the sampler and the scoring over those logits."""
    num_tokens = sum(chunk.num_tokens for chunk in chunks)
    everything = list(range(num_tokens))
    readout = Readout(
        logit_index=everything if backbone.kind.generates else [],
        hidden_index=everything if backbone.heads or backbone.bare_head else [],
    )
    result = runner.run(chunks, readout, prompts={})
    if result.logits is not None:
        rows = [chunk.row for chunk in chunks]
        sample(result.logits[: len(rows)], rows, draws(rows))
        score(result.logits, [DUMMY_TOKEN] * num_tokens, [rows[0]] * num_tokens)


def pool_budget(config: EngineConfig, profile: MemoryProfile | None) -> int:
    """The pool's bytes: as configured, else a share of what the profile left free, else the CPU default."""
    if config.kv_cache_bytes is not None:
        if profile is not None and config.kv_cache_bytes > profile.free_bytes - profile.activation_bytes:
            logger.warning(
                "kv_cache_bytes (%d) leaves less than the profiled activation peak (%d bytes) of the %d free: the "
                "largest steps may run out of memory", config.kv_cache_bytes, profile.activation_bytes,
                profile.free_bytes,
            )  # fmt: skip
        return config.kv_cache_bytes
    if profile is not None:
        return profile.pool_budget(config.kv_cache_memory_fraction, reserved_bytes(config))
    return CPU_DEFAULT_BYTES


def reserved_bytes(config: EngineConfig) -> int:
    """Device memory the engine's task caches may fill after the pool is allocated, kept out of its share."""
    return config.prompt_cache_bytes + config.adapter_cache_bytes


def describe_pool(num_blocks: int, block_bytes: int, block_size: int, profile: MemoryProfile | None) -> str:
    """The start-up log line: the pool, and what the profile measured beside it."""
    pool = f"KV pool: {num_blocks} blocks of {block_size} tokens, {num_blocks * block_bytes / 2**30:.2f} GiB"
    if profile is None:
        return f"{pool} (not profiled: its size is configured or the CPU default)"
    return (
        f"{pool}; weights {profile.weights_bytes / 2**30:.2f} GiB, activations peak "
        f"{profile.activation_bytes / 2**30:.2f} GiB (profiled), {profile.free_bytes / 2**30:.2f} GiB free before it"
    )
