"""The KV pool sized by profiling, on the CPU through an injected memory probe: the order (weights, the worst step,
then the pool), the arithmetic, the start-up line, and a worst step that reaches the attention limits every later
step is held to, for every backbone kind."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from server.engine import attention, kv_pool
from server.engine.attention import RowBatch
from server.engine.backbone import Backbone, load_backbone
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.memory_profile import MAX_TILE_KEYS, MAX_TILE_PAIRS, WorstStep
from tests.fixtures import TinyBackbone
from tests.nlu_fixtures import write_nlu_backbone
from tests.seq2seq_fixtures import write_seq2seq_backbone

GiB = 1 << 30


@dataclass
class FakeProbe:
    """A device with `free` bytes, whose tensors hold `weights` bytes and whose worst step peaks `activations`
    above what it held when the peak started; each reading goes in `events`."""

    events: list[str]
    free: int = 10 * GiB
    weights: int = 2 * GiB
    activations: int = 3 * GiB
    held: list[int] = field(default_factory=list)

    def free_bytes(self) -> int:
        self.events.append("free")
        return self.free

    def allocated_bytes(self) -> int:
        self.events.append("allocated")
        return self.weights

    def start_peak(self) -> None:
        self.events.append("start_peak")

    def peak_bytes(self) -> int:
        self.events.append("peak")
        return self.weights + self.activations

    def release_cached(self) -> None:
        self.events.append("release")


def engine_with(backbone: Backbone, probe: FakeProbe | None, monkeypatch: pytest.MonkeyPatch, **config) -> Engine:
    """An engine whose pool allocations and model forwards are recorded in the probe's events."""
    events = probe.events if probe is not None else []
    allocate = kv_pool.KVPool.allocate.__func__  # type: ignore[attr-defined]

    def recorded(cls, fp, num_layers, num_blocks, *args):  # type: ignore[no-untyped-def]
        events.append(f"pool {num_blocks}")
        return allocate(cls, fp, num_layers, num_blocks, *args)

    monkeypatch.setattr(kv_pool.KVPool, "allocate", classmethod(recorded))
    embeddings = backbone.model.get_input_embeddings()  # every kind's pass embeds its tokens

    def record_forward(*_: object) -> None:
        if events[-1:] != ["forward"]:
            events.append("forward")

    hook = embeddings.register_forward_pre_hook(record_forward)
    try:
        return Engine(backbone, EngineConfig(device="cpu", dtype="float32", **config), probe)  # type: ignore[arg-type]
    finally:
        hook.remove()


@pytest.fixture
def llama(tiny_llama: TinyBackbone) -> Backbone:
    return load_backbone(str(tiny_llama.path), "cpu", "float32")


def test_the_pool_takes_its_share_of_what_weights_and_the_worst_step_leave(llama: Backbone, monkeypatch):
    probe = FakeProbe([])
    engine = engine_with(llama, probe, monkeypatch, kv_cache_memory_fraction=0.5)
    reserved = engine.config.prompt_cache_bytes + engine.config.adapter_cache_bytes  # the task caches fill later
    expected_blocks = (int((probe.free - probe.activations) * 0.5) - reserved) // engine.pool.block_bytes
    assert engine.memory.num_blocks == expected_blocks
    assert probe.events == [
        "allocated",  # the weights, before anything of the engine's
        f"pool {-(-WorstStep.of(engine.config, llama).num_slots // engine.config.kv_block_size) + 1}",  # scratch
        "start_peak",
        "allocated",
        "forward",  # the worst step
        "peak",
        "release",  # its memory given back before the free memory is read
        "free",
        f"pool {expected_blocks + 1}",  # then the pool
    ]


def test_the_task_caches_budgets_are_kept_out_of_the_pools_share(llama: Backbone, monkeypatch):
    probe = FakeProbe([])
    small = engine_with(llama, probe, monkeypatch, adapter_cache_bytes=0, prompt_cache_bytes=0)
    large = engine_with(llama, FakeProbe([]), monkeypatch, adapter_cache_bytes=GiB, prompt_cache_bytes=GiB // 2)
    freed = (small.memory.num_blocks - large.memory.num_blocks) * small.pool.block_bytes
    assert 1.5 * GiB - small.pool.block_bytes < freed <= 1.5 * GiB


def test_a_configured_pool_size_is_kept_and_warned_about_when_it_leaves_too_little(llama: Backbone, monkeypatch,
                                                                                    caplog):  # fmt: skip
    probe = FakeProbe([], free=4 * GiB, activations=3 * GiB)
    with caplog.at_level(logging.WARNING):
        engine = engine_with(llama, probe, monkeypatch, kv_cache_bytes=2 * GiB)
    assert engine.memory.num_blocks == 2 * GiB // engine.pool.block_bytes
    assert "leaves less than the profiled activation peak" in caplog.text


def test_without_a_probe_a_cpu_pool_is_not_profiled(llama: Backbone, monkeypatch):
    def profile(*args: object) -> None:
        raise AssertionError("profiled without a probe")

    monkeypatch.setattr("server.engine.engine.profile_memory", profile)
    engine = Engine(llama, EngineConfig(device="cpu", dtype="float32"))
    assert engine.memory.num_blocks == kv_pool.CPU_DEFAULT_BYTES // engine.pool.block_bytes


def test_the_start_up_line_names_the_pool_and_the_profiled_peak(llama: Backbone, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="server.engine.engine"):
        engine = engine_with(llama, FakeProbe([]), monkeypatch)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("KV pool:")]
    gib = engine.memory.num_blocks * engine.pool.block_bytes / GiB
    assert lines == [
        f"KV pool: {engine.memory.num_blocks} blocks of 8 tokens, {gib:.2f} GiB; weights 2.00 GiB, activations peak "
        "3.00 GiB (profiled), 10.00 GiB free before it"
    ]


@pytest.fixture(scope="module", params=["llama", "gpt2", "t5", "bart", "bert", "deberta_v2"])
def any_kind(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    name: str = request.param
    if name in ("llama", "gpt2"):
        path = request.getfixturevalue(f"tiny_{name}").path
    elif name in ("t5", "bart"):
        path = write_seq2seq_backbone(name, tmp_path_factory.mktemp(name))
    else:
        path = write_nlu_backbone(name, tmp_path_factory.mktemp(name))
    return load_backbone(str(path), "cpu", "float32")


@pytest.mark.parametrize("step_tokens", [24, 300])
def test_the_worst_step_reaches_the_attention_limits_of_every_step(any_kind: Backbone, monkeypatch, step_tokens):
    """The profile's step pads one attention call as far as the limits let any step (so its peak is the real one),
    and runs through every kind's pass: its tokens, the longest rows and the largest encoder input."""
    batches: list[RowBatch] = []
    attend_batches = attention.attend_batches

    def recorded(query, num_kv_heads, keys, values, step_batches, *args, **kwargs):  # type: ignore[no-untyped-def]
        batches.extend(step_batches)
        return attend_batches(query, num_kv_heads, keys, values, step_batches, *args, **kwargs)

    monkeypatch.setattr(attention, "attend_batches", recorded)
    probe = FakeProbe([])
    config = {"max_batch_tokens": step_tokens, "max_batch_size": 6, "max_input_tokens": 40, "max_new_tokens_limit": 30,
              "max_virtual_tokens": 10, "kv_cache_bytes": 1 << 22}  # fmt: skip
    engine = engine_with(any_kind, probe, monkeypatch, **config)
    worst, limits = WorstStep.of(engine.config, any_kind), engine.runner.limits
    assert "forward" in probe.events
    assert limits == worst.limits and limits.pairs < MAX_TILE_PAIRS and limits.keys < MAX_TILE_KEYS
    if any_kind.kind.name == "encoder" and not batches:
        return  # its attention is its own (DeBERTa-v2): padded whole rows, no engine attention to reach
    shapes = [(b.query_index.shape[0], b.query_index.shape[1], b.gather_slots.shape[1]) for b in batches]
    assert max(rows * queries * keys for rows, queries, keys in shapes) == limits.pairs
    assert max(rows * keys for rows, _, keys in shapes) == limits.keys
    assert all(limits.fits(*shape) or shape[0] == 1 for shape in shapes)


def test_every_later_step_stays_within_the_limits(tiny_llama: TinyBackbone, tmp_path: Path, monkeypatch):
    from tests.engine.harness import Harness

    harness = Harness(tiny_llama, tmp_path / "store", max_batch_tokens=16, max_batch_size=4)
    harness.engine.runner.limits = WorstStep.of(harness.config, harness.backbone).limits
    shapes: list[torch.Size] = []
    attend_batches = attention.attend_batches

    def recorded(query, num_kv_heads, keys, values, step_batches, *args, **kwargs):  # type: ignore[no-untyped-def]
        shapes.extend((b.query_index.shape[0], b.query_index.shape[1], b.gather_slots.shape[1]) for b in step_batches)
        return attend_batches(query, num_kv_heads, keys, values, step_batches, *args, **kwargs)

    monkeypatch.setattr(attention, "attend_batches", recorded)
    texts = ["a", "a much longer input than the others, by far" * 3, "mid length text", "xy"]
    harness.run(*(harness.request(text, None, max_new_tokens=20) for text in texts))
    limits = harness.engine.runner.limits
    assert shapes and all(limits.fits(*shape) for shape in shapes)
