"""Every tensor the step builds names its device (tests/engine/device_guard.py), over every path a step can take:
each adapter kind with prompts held as keys and values and fed as embeddings, chunked prefill, seeded sampling with
top log-probabilities, scoring, classification, an encoder-decoder, an encoder, and attention cut into tiles."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from prompt_store.registry import TaskStore
from server.engine import model_runner, sampler
from server.engine.adapters import DeviceAdapter, DeviceIA3, DeviceLora, LoraStack
from server.engine.attention import TileLimits
from server.engine.backbone import load_backbone
from server.engine.intake import make_generators
from server.engine.kv_pool import HOST, to_device
from server.engine.model_runner import ModelRunner
from server.engine.readout import Readout
from server.engine.request import Request, Sequence
from server.engine.sampler import choose, draws, sample, suppress_eos
from server.engine.types import ClassifyInput, EnsembleMode, SamplingParams, ScoreInput
from tests.engine.device_guard import DeviceGuard, caller_in_engine
from tests.engine.harness import Harness
from tests.engine.test_nlu import Driver
from tests.fixtures import ADAPTER_KINDS, TinyBackbone
from tests.lora_fixtures import write_module_adapter
from tests.nlu_fixtures import write_nlu_backbone
from tests.seq2seq_fixtures import SEQ2SEQ_ADAPTER_KINDS, build_tiny_seq2seq_backbone

SAMPLING = {"max_new_tokens": 4, "do_sample": True, "seed": 3, "top_k": 5, "top_p": 0.9, "top_logprobs": 2}


def guarded_steps(harness: Harness, tasks: tuple[str | None, ...]) -> DeviceGuard:
    for task in tasks:
        harness.engine.add(harness.request("hello world, a longer input " + str(task), task, **SAMPLING))
    guard = DeviceGuard()
    while harness.engine.has_work():
        with guard:
            harness.step()
    return guard


def test_the_guard_catches_a_tensor_made_without_a_device(tiny_llama: TinyBackbone, tmp_path: Path, monkeypatch):
    """It can fail: a step whose layout's tensors are made with no device is caught, and the place named."""
    monkeypatch.setattr(model_runner, "HOST", None)
    guard = guarded_steps(Harness(tiny_llama, tmp_path / "store"), (None,))
    assert guard.unplaced and all(site.startswith("server/engine/model_runner.py") for site in guard.unplaced)


@pytest.mark.parametrize(
    "config",
    [{}, {"cache_prompt_kv": False, "max_batch_tokens": 5, "kv_block_size": 4}],
    ids=["prompts-as-kv", "prompts-as-embeddings-chunked"],
)
def test_a_causal_step_names_every_device(tiny_llama: TinyBackbone, tmp_path: Path, config: dict[str, object]):
    harness = Harness(tiny_llama, tmp_path / "store", **config)  # type: ignore[arg-type]
    harness.engine.runner.limits = TileLimits(pairs=64, keys=48)  # tiles too
    assert guarded_steps(harness, (*ADAPTER_KINDS, None)).unplaced == []


def test_an_encoder_decoder_step_names_every_device(tmp_path: Path):
    harness = Harness(build_tiny_seq2seq_backbone("t5", tmp_path / "t5"), tmp_path / "store", max_batch_tokens=9)
    assert guarded_steps(harness, (*SEQ2SEQ_ADAPTER_KINDS, None)).unplaced == []


def test_scoring_and_classification_steps_name_every_device(tiny_llama: TinyBackbone, tmp_path: Path):
    backbone = load_backbone(str(tiny_llama.path), "cpu", "float32")
    store = TaskStore(tmp_path / "store", backbone.fingerprint)
    for kind, adapter in tiny_llama.adapters.items():
        store.register_dir(kind, adapter)
    driver = Driver(backbone, store, max_batch_tokens=7)
    driver.score(ScoreInput("Is it true?", ("yes", "no, it is not"), ("prefix",)))
    encoder = load_backbone(str(write_nlu_backbone("bert", tmp_path / "bert")), "cpu", "float32")
    classifier = Driver(encoder, TaskStore(tmp_path / "nlu-store", encoder.fingerprint))
    classifier.classify(ClassifyInput(("Hello world", "ok")))
    guard = DeviceGuard()
    with guard:
        driver.run()
        classifier.run()
    assert guard.unplaced == []


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_steps_index_tensors_reach_the_device_in_one_copy():
    host = [
        torch.arange(6).view(2, 3),
        torch.tensor([7]),
        torch.arange(4).view(2, 2, 1),
        torch.zeros(0, dtype=torch.long),
    ]
    assert to_device(host, HOST) is host  # on the host they stay where they are
    with Ops() as ops:
        moved = to_device(host, torch.device("meta"))  # a device of its own on a CPU-only machine
    assert sum("_to_copy" in name for name in ops.names) == 1
    assert [(t.shape, t.device.type) for t in moved] == [(t.shape, "meta") for t in host]
    with pytest.raises(TypeError, match=r"expected tensors of one dtype; found \['torch.float32', 'torch.int64'\]"):
        to_device([torch.zeros(2), torch.arange(2)], torch.device("meta"))


class Transfers(TorchDispatchMode):
    """The copies between devices, (from, to) for each: the operations' own (`to`, which inference mode dispatches as
    itself rather than `_to_copy`, and `copy_`), and a tensor made from host data straight on another device
    (`torch.tensor(data, device=...)`: a copy the dispatcher does not see)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        moves = func is torch.ops.aten._to_copy.default or func.overloadpacket is torch.ops.aten.to  # (inference mode)
        if moves and result.device != args[0].device:
            self.copies.append((args[0].device.type, result.device.type))
        elif func is torch.ops.aten.copy_.default and args[0].device != args[1].device:
            self.copies.append((args[1].device.type, args[0].device.type))
        return result


class MadeFromData(TorchFunctionMode):
    def __init__(self, transfers: Transfers) -> None:
        super().__init__()
        self.transfers = transfers

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor) and device is not None and torch.device(device).type != "cpu":
            self.transfers.copies.append(("cpu", torch.device(device).type))
        return func(*args, **kwargs)


@pytest.mark.parametrize("vocab", [50, 3000])  # 3000: the draw inverted in two steps
def test_the_sampled_rows_parameters_and_draws_reach_the_device_in_one_copy(vocab: int, monkeypatch):
    """However many chunks the sampled rows are drawn in (two rows a chunk here)."""
    monkeypatch.setattr(sampler, "SAMPLE_CHUNK_ELEMENTS", 2 * vocab)
    params = [
        SamplingParams(),
        SamplingParams(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, seed=1),
        SamplingParams(do_sample=True),
        SamplingParams(do_sample=True, top_p=0.5),
    ]
    scores = torch.zeros(len(params), vocab, device="meta")
    uniforms = torch.rand(len(params), dtype=torch.float64, device=HOST)
    with Transfers() as transfers, MadeFromData(transfers):
        tokens = choose(scores, params, uniforms)
    assert tokens.device.type == "meta"
    assert transfers.copies == [("cpu", "meta")]


def on_meta(harness: Harness) -> ModelRunner:
    """The harness's runner with its model and pool on the meta device, a device of its own on a CPU-only machine:
    a copy from the host shows as one, and a read back to the host fails (a meta tensor has no values)."""
    runner, meta = harness.engine.runner, torch.device("meta")
    runner.model.to(meta)
    for tensors in (runner.pool.keys, runner.pool.values):
        tensors[:] = [tensor.to(meta) for tensor in tensors]
    runner.backbone, runner.device = replace(runner.backbone, device=meta), meta
    adapters = runner.tasks.adapters
    for adapter in adapters.resident.values():  # LoRA / IA3 weights, which the task cache holds on the device
        adapter.modules = {name: to_meta(weights) for name, weights in adapter.modules.items()}
    for stack in adapters.hooks.stacks.values():
        stack.lora_a, stack.lora_b = stack.lora_a.to(meta), stack.lora_b.to(meta)
    adapters.hooks.tables.clear()  # rebuilt from the weights at the next pass
    return runner


def to_meta(weights: DeviceLora | DeviceIA3) -> DeviceLora | DeviceIA3:
    if isinstance(weights, DeviceLora):
        return replace(weights, lora_a=weights.lora_a.to("meta"), lora_b=weights.lora_b.to("meta"))
    return replace(weights, scales=weights.scales.to("meta"))


def transfers_of_step(harness: Harness, steps_before: int) -> tuple[list[tuple[str, str]], list[str]]:
    """The copies between devices one step's pass makes, and where those that block the host are made (its rows'
    tasks already loaded on the device, as the step loads them before the pass), `steps_before` steps after the
    requests were added."""
    for _ in range(steps_before):
        harness.step()
    plan = harness.engine.scheduler.schedule()
    chunks, prompts = harness.engine.prepare(plan.admitted, plan.chunks)
    runner = on_meta(harness)
    prompts = {key: vectors.to(runner.device) for key, vectors in prompts.items()}
    with Transfers() as transfers, MadeFromData(transfers), Blocking() as blocking:
        result = runner.run(chunks, Readout.of(chunks), prompts)
    assert result.logits is not None and result.logits.device.type == "meta"
    return transfers.copies, blocking.copies


@pytest.mark.parametrize("steps_before", [0, 1], ids=["prefill", "decode"])
def test_a_causal_steps_pass_takes_its_host_tensors_to_the_device_in_one_copy(
    tiny_llama: TinyBackbone, tmp_path: Path, steps_before: int
):
    """The layout's index tensors, the tokens' ids and the positions read out, for plain rows and prompt tasks held
    as keys and values and fed as embeddings; no read back within the pass."""
    harness = Harness(tiny_llama, tmp_path / "store", cache_prompt_kv=False)
    for task in (None, "prompt_tuning", "prefix"):
        harness.engine.add(harness.request("hello world " + str(task), task, max_new_tokens=4))
    assert transfers_of_step(harness, steps_before) == ([("cpu", "meta")], [])


@pytest.mark.parametrize("steps_before", [0, 1], ids=["prefill", "decode"])
def test_an_encoder_decoder_steps_pass_takes_its_host_tensors_to_the_device_in_one_copy(
    tmp_path: Path, steps_before: int
):
    harness = Harness(build_tiny_seq2seq_backbone("t5", tmp_path / "t5"), tmp_path / "store")
    for task in (None, "prompt_tuning", "prefix"):
        harness.engine.add(harness.request("hello world " + str(task), task, max_new_tokens=4))
    assert transfers_of_step(harness, steps_before) == ([("cpu", "meta")], [])


@pytest.mark.parametrize("steps_before", [0, 1], ids=["prefill", "decode"])
def test_a_lora_and_ia3_steps_pass_makes_no_copy_that_blocks(tiny_llama: TinyBackbone, tmp_path: Path, steps_before):
    """LoRA and IA3 rows beside plain ones: the tokens' task groups reach the device in copies of their own (they are
    known once the pass reaches a LoRA module), each from pinned memory without blocking; none is read back."""
    harness = Harness(tiny_llama, tmp_path / "store")
    adapters = {name: write_module_adapter(tiny_llama.path, method, tmp_path / name, seed=seed, **settings)
                for seed, (name, method, settings) in enumerate(MODULE_ADAPTERS)}  # fmt: skip
    for name, directory in adapters.items():
        harness.store.register_dir(name, directory)
    for task in (None, *adapters, "lora-a"):
        harness.engine.add(harness.request("hello world " + str(task), task, max_new_tokens=4))
    copies, blocking = transfers_of_step(harness, steps_before)
    assert copies and set(copies) == {("cpu", "meta")}
    assert blocking == []


MODULE_ADAPTERS = (
    ("lora-a", "lora", {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4}),
    ("lora-b", "lora", {"target_modules": ["k_proj", "up_proj"], "r": 8}),
    ("ia3", "ia3", {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
)


class Blocking(TorchFunctionMode):
    """The copies to another device that block the host, where promptserve makes them: `to` without non_blocking
    (from memory not pinned), a tensor made from host data on the device (`torch.tensor(data, device=...)`)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.Tensor.to and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu":
            device = next((a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (torch.device, str))), None)
            if device is not None and torch.device(device).type != "cpu" and not kwargs.get("non_blocking"):
                self.copies.append(caller_in_engine() or "outside the engine")
        elif func in (torch.tensor, torch.as_tensor) and torch.device(kwargs.get("device") or "cpu").type != "cpu":
            self.copies.append(caller_in_engine() or "outside the engine")
        return func(*args, **kwargs)


def test_a_lora_stack_resized_reads_nothing_back_from_the_device():
    """Its places' order is known on the host (a meta tensor cannot be read: the resize would raise)."""
    weights = DeviceLora(torch.zeros(4, 16, device="meta"), torch.zeros(8, 4, device="meta"), scaling=2.0)
    tasks = [DeviceAdapter(("task", version), {"q_proj": weights}, nbytes=0) for version in range(3)]
    stack = LoraStack(weights, num_places=2, rank=4)
    for task in tasks:
        stack.place("q_proj", task)  # the third doubles the places
    stack.resize(8, rank=8)
    assert stack.ranks == [4, 4, 4, 0, 0, 0, 0, 0] and stack.lora_a.shape == (8, 8, 16)


def test_sampling_min_tokens_and_mean_ensembles_copies_nothing_that_blocks():
    """Rows short of their min_tokens and a mean ensemble beside sampled and greedy rows: their index tensors reach
    the device without blocking, up to the sampler's one read back (which a meta tensor cannot give)."""
    ensemble = Request("e", [1], SamplingParams(do_sample=True, seed=4), 8, lambda output: None, EnsembleMode.MEAN,
                       generators=make_generators(SamplingParams(do_sample=True, seed=4), 2))  # fmt: skip
    ensemble.rows = [Sequence(ensemble, None, i) for i in range(2)]
    short = Request("s", [1], SamplingParams(min_tokens=3, top_logprobs=2), 8, lambda output: None)
    short.rows = [Sequence(short, None)]
    rows = [short.rows[0], *ensemble.rows]
    logits = torch.zeros(len(rows), 50, device="meta")
    with Blocking() as blocking, pytest.raises(NotImplementedError, match="meta tensor"):
        sample(suppress_eos(logits, rows, frozenset({2})), rows, draws(rows))
    assert blocking.copies == []
