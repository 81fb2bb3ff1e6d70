"""Every tensor the step builds names its device (tests/engine/device_guard.py), over every path a step can take:
each adapter kind with prompts held as keys and values and fed as embeddings, chunked prefill, seeded sampling with
top log-probabilities, scoring, classification, an encoder-decoder, an encoder, and attention cut into tiles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from prompt_store.registry import TaskStore
from server.engine import model_runner, sampler
from server.engine.attention import TileLimits
from server.engine.backbone import load_backbone
from server.engine.kv_pool import HOST, to_device
from server.engine.sampler import choose
from server.engine.types import ClassifyInput, SamplingParams, ScoreInput
from tests.engine.device_guard import DeviceGuard
from tests.engine.harness import Harness
from tests.engine.test_nlu import Driver
from tests.fixtures import ADAPTER_KINDS, TinyBackbone
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
    """The copies between devices, (from, to) for each: the operations' own (`to`, `copy_`), and a tensor made from
    host data straight on another device (`torch.tensor(data, device=...)`: a copy the dispatcher does not see)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and result.device != args[0].device:
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
