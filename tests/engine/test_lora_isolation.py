"""A LoRA / IA3 request's fault is its own (issue 27): its task's weights failing to reach the device, a target module
the engine cannot adapt per token, its task deleted or replaced mid-answer, more distinct tasks than max_loras. Each
is injected while a LoRA row of another task, an IA3 row, a sampled prompt row and a bare row are mid-answer; they
finish with exactly the tokens they have alone, and every hold on the adapter pool returns to zero."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.hooks import RemovableHandle
from transformers import AutoModelForSequenceClassification

from prompt_store.errors import InvalidTask
from prompt_store.registry import TaskStore
from prompt_store.types import LoraWeights
from server.engine import adapters as adapters_module
from server.engine.async_engine import build_engine
from server.engine.backbone import Backbone, load_backbone
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.errors import GenerationFailed, UnservableTarget
from server.engine.nlu import plan_classify
from server.engine.selfcheck import self_check
from server.engine.types import ClassifyInput, EngineOutput, EnsembleMode
from tests.engine import test_isolation as isolation_tests
from tests.engine.harness import Harness, token_ids
from tests.engine.test_isolation import error_of
from tests.engine.test_nlu import LIMITS
from tests.fixtures import TinyBackbone
from tests.lora_fixtures import write_module_adapter
from tests.nlu_fixtures import encoder_tokenizer, load_nlu_peft, peft_logits, write_nlu_backbone

ADAPTERS: dict[str, dict[str, Any]] = {
    "lora-a": {"method": "lora", "target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4},
    "lora-b": {"method": "lora", "target_modules": ["k_proj", "o_proj", "up_proj"], "r": 8},
    "lora-c": {"method": "lora", "target_modules": ["gate_proj"], "r": 2},
    "ia3": {"method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
}  # fmt: skip
VARIANTS = {"whole": {}, "chunked": {"max_batch_tokens": 7, "kv_block_size": 4}}


@pytest.fixture(scope="module")
def module_adapters(tiny_llama: TinyBackbone, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-isolation")
    adapters = {}
    for seed, (name, settings) in enumerate(ADAPTERS.items()):
        given = {key: value for key, value in settings.items() if key != "method"}
        adapters[name] = write_module_adapter(tiny_llama.path, settings["method"], root / name, seed=seed, **given)
    return adapters


def served(tiny: TinyBackbone, store: Path, adapters: dict[str, Path], **config: Any) -> Harness:
    harness = Harness(tiny, store, **config)
    for name, directory in adapters.items():
        harness.store.register_dir(name, directory)
    return harness


@pytest.fixture(params=list(VARIANTS))
def harness(tiny_llama: TinyBackbone, tmp_path: Path, module_adapters: dict[str, Path], request: Any) -> Harness:
    return served(tiny_llama, tmp_path / "store", module_adapters, **VARIANTS[request.param])


class Mates(isolation_tests.Mates):
    """Requests already mid-answer when the fault arrives: a LoRA row, an IA3 row, a seeded sampled prompt row and a
    bare row. Each must end with the tokens it has alone, and every hold on the adapter pool be given back."""

    SPECS = (
        ("mate one", "lora-a", {}),
        ("mate two", "ia3", {}),
        ("mate three", "prompt_tuning", {"do_sample": True, "seed": 7}),
        ("mate four", None, {}),
    )

    def finish_unchanged(self) -> None:
        super().finish_unchanged()
        assert self.harness.engine.tasks.adapters.slots.holds == {}


def test_a_lora_task_whose_weights_fail_to_reach_the_device_fails_only_its_requests(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = token_ids(harness.alone("later", "lora-b", max_new_tokens=6))
    harness.engine.tasks.adapters.resident.pop(("lora-b", 1))  # its next row loads it again
    real = adapters_module.DeviceAdapter.of

    def failing(artifact: Any, device: torch.device, dtype: torch.dtype) -> Any:
        if artifact.key == ("lora-b", 1):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (injected)")
        return real(artifact, device, dtype)

    mates = Mates(harness)
    monkeypatch.setattr(adapters_module.DeviceAdapter, "of", staticmethod(failing))
    alone = harness.request("doomed", "lora-b")
    ensemble = harness.request("doomed too", "prefix", "lora-b", ensemble=EnsembleMode.VOTE)
    harness.engine.add(alone)
    harness.engine.add(ensemble)
    mates.finish_unchanged()
    for request in (alone, ensemble):
        error = error_of(harness, request)
        assert isinstance(error, GenerationFailed)
        assert "loading task 'lora-b' version 1" in str(error) and "CUDA out of memory" in str(error)
    assert ("lora-b", 1) not in harness.engine.tasks.adapters.resident  # nothing half-loaded
    monkeypatch.setattr(adapters_module.DeviceAdapter, "of", real)
    assert token_ids(harness.alone("later", "lora-b", max_new_tokens=6)) == expected


def test_a_target_module_the_backbone_lacks_fails_only_its_requests(harness: Harness) -> None:
    """An artifact naming a module the engine has no hook point for (a store written against another backbone
    revision): refused at load, naming the module, before any hook is installed."""
    mates = Mates(harness)
    doomed = harness.request("doomed", "lora-c")
    row = doomed.rows[0]
    assert row.task is not None
    ghost = "model.layers.0.mlp.ghost_proj"
    renamed = [replace(w, module=ghost) if isinstance(w, LoraWeights) else w for w in row.task.modules]
    row.task = replace(row.task, modules=tuple(renamed))
    harness.engine.add(doomed)
    mates.finish_unchanged()
    error = error_of(harness, doomed)
    assert isinstance(error, UnservableTarget)
    assert f"task 'lora-c' version 1 targeting '{ghost}'" in str(error) and "no module of that name" in str(error)
    assert ghost not in harness.engine.tasks.adapters.hooks.handles


def projecting_other_inputs(backbone: Backbone, name: str) -> RemovableHandle:
    """Make the backbone also run module `name` on three vectors that are not the tokens, once per pass (as
    DeBERTa's attention projects its relative positions through its query and key projections)."""
    module, hidden = backbone.modules[name], backbone.fingerprint.hidden_size

    def project_positions(attention: torch.nn.Module, args: Any) -> None:
        module(torch.ones(1, 3, hidden))  # [1, 3, H]

    return backbone.modules[f"{name.split('.mlp.')[0]}.self_attn"].register_forward_pre_hook(project_positions)


def test_a_target_module_that_also_sees_other_inputs_fails_only_its_requests(harness: Harness) -> None:
    """A module the backbone also runs on vectors that are not the tokens (as DeBERTa's attention projects its
    relative positions with its query and key projections): found in the shared pass, which fails the requests of
    the task targeting it and runs again without them; later requests of such a task fail at load. A task whose hook
    sits on another module, and the same module's other tasks' absence, are unaffected."""
    extra = projecting_other_inputs(harness.backbone, "model.layers.0.mlp.gate_proj")
    try:
        mates = Mates(harness)
        doomed = harness.request("doomed", "lora-c")  # lora-c adapts gate_proj
        ensemble = harness.request("doomed too", "lora-a", "lora-c", ensemble=EnsembleMode.VOTE)
        harness.engine.add(doomed)
        harness.engine.add(ensemble)
        mates.finish_unchanged()
        for request in (doomed, ensemble):
            error = error_of(harness, request)
            assert isinstance(error, UnservableTarget), error
            assert "'model.layers.0.mlp.gate_proj'" in str(error) and "not the pass's" in str(error)
        later = harness.request("later", "lora-c")
        harness.engine.add(later)
        harness.run()
        assert isinstance(error_of(harness, later), UnservableTarget)
        assert harness.is_idle() and harness.engine.tasks.adapters.slots.holds == {}
    finally:
        extra.remove()


def test_a_lora_task_replaced_or_deleted_mid_answer_finishes_on_its_version(
    harness: Harness, module_adapters: dict[str, Path]
) -> None:
    """The running rows keep the version they started with; a request after the change gets the new version (or
    is refused, deleted); the old versions' weights leave the pool on their last rows' release."""
    replacement = token_ids(harness.alone("after", "lora-b", max_new_tokens=8))
    mates = Mates(harness)
    harness.store.register_dir("lora-a", module_adapters["lora-b"])
    harness.engine.retire_task("lora-a", 2)  # what the server does when the store announces version 2
    harness.store.delete("ia3")
    harness.engine.retire_task("ia3", None)
    assert harness.engine.tasks.adapters.resident[("lora-a", 1)].is_retired  # still held by the mate's row
    mates.finish_unchanged()
    resident = harness.engine.tasks.adapters.resident
    assert ("lora-a", 1) not in resident and ("ia3", 1) not in resident
    assert token_ids(harness.alone("after", "lora-a", max_new_tokens=8)) == replacement


def test_more_lora_tasks_than_max_loras_wait_while_the_others_finish(
    tiny_llama: TinyBackbone, tmp_path: Path, module_adapters: dict[str, Path]
) -> None:
    """With room for two LoRA / IA3 tasks (the mates hold two), rows of three more tasks wait rather than fail;
    the mates finish unchanged, and then every waiting row answers as it does alone."""
    harness = served(tiny_llama, tmp_path / "store", module_adapters, max_loras=2)
    later = [("x", "lora-b"), ("y", "lora-c"), ("z", "lora-b")]
    expected = [token_ids(harness.alone(text, task, max_new_tokens=6)) for text, task in later]
    mates = Mates(harness)
    waiting = [harness.request(text, task, max_new_tokens=6) for text, task in later]
    for request in waiting:
        harness.engine.add(request)
    while harness.engine.has_work():
        harness.step()
        assert len(harness.engine.tasks.adapters.slots.holds) <= 2
    mates.finish_unchanged()
    assert [token_ids(harness.completion(request.request_id)) for request in waiting] == expected


def test_a_task_whose_target_also_sees_other_inputs_is_refused_at_registration(
    tiny_llama: TinyBackbone, tmp_path: Path, module_adapters: dict[str, Path]
) -> None:
    """The registration probe runs the task: the pass finds the module, the upload is refused (422) in the task's
    name, not stored."""
    engine = build_engine(EngineConfig(model=str(tiny_llama.path), store_dir=str(tmp_path / "store"),
                                       poll_interval_s=0, self_check=False))  # fmt: skip
    try:
        projecting_other_inputs(engine.engine.backbone, "model.layers.0.mlp.gate_proj")
        module = r"'model\.layers\.0\.mlp\.gate_proj', which the backbone also"
        with pytest.raises(InvalidTask, match=rf"found task 'positional' targeting {module}"):  # not the probe's id
            engine.register_task("positional", *upload_of(module_adapters["lora-c"]))
        assert "positional" not in {record.task_id for record in engine.list_tasks()}
        engine.register_task("elsewhere", *upload_of(module_adapters["lora-b"]))  # its targets see only tokens
    finally:
        engine.shutdown()


def upload_of(adapter: Path) -> tuple[bytes, bytes]:
    return (adapter / "adapter_config.json").read_bytes(), (adapter / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def deberta_v3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A DeBERTa-v2 encoder configured as DeBERTa-v3 is (share_att_key): its query and key projections also project
    the relative positions, 2 * 128 of them here, shared by every row of a pass."""
    root = tmp_path_factory.mktemp("deberta-v3")
    path = write_nlu_backbone("deberta_v2", root / "deberta")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "share_att_key": True}))
    adapters = {
        name: write_module_adapter(path, "lora", root / name, seed=seed, auto=AutoModelForSequenceClassification,
                                   task_type="SEQ_CLS", target_modules=[target])
        for seed, (name, target) in enumerate([("values", "value_proj"), ("queries", "query_proj")])
    }  # fmt: skip
    backbone = load_backbone(str(path), "cpu", "float32")
    store = TaskStore(root / "store", backbone.fingerprint)
    for name, directory in adapters.items():
        store.register_dir(name, directory)
    return {"path": path, "adapters": adapters, "backbone": backbone, "store": store}


@pytest.mark.parametrize("width", [13, 32])  # 8 rows of 32: as many padded tokens as relative positions
def test_a_lora_on_deberta_v3s_position_projections_fails_alone(deberta_v3: dict[str, Any], width: int) -> None:
    """PEFT's default LoRA targets on DeBERTa-v3 include query_proj, which also projects the relative positions
    every row of the pass shares: that task's requests fail, the other rows of the same steps equal PEFT's."""
    backbone, store = deberta_v3["backbone"], deberta_v3["store"]
    engine = Engine(backbone, EngineConfig(device="cpu", dtype="float32", kv_cache_bytes=1 << 24))
    texts = ("Hello world", "x" * (width - 2))  # a byte per character, and BOS and EOS
    outputs: dict[tuple[str | None, int], list[EngineOutput]] = {}
    for task in ("values", "queries", None, "values"):
        sinks = [partial(on_output, outputs.setdefault((task, i), [])) for i in range(len(texts))]
        engine.add_all(plan_classify(ClassifyInput(texts, (task,)), backbone, store, LIMITS, sinks).requests)
    while engine.has_work():
        engine.step()
    for i in range(len(texts)):
        error = outputs[("queries", i)][-1].error
        assert isinstance(error, UnservableTarget) and "attention.self.query_proj" in str(error)
    ids = [torch.tensor([encoder_tokenizer()(text)["input_ids"]]) for text in texts]
    assert ids[1].shape[1] == width
    for task in ("values", None):
        model = load_nlu_peft(deberta_v3["path"], "seq", deberta_v3["adapters"][task] if task else None)
        for i, row_ids in enumerate(ids):
            expected = torch.softmax(peft_logits(model, row_ids, torch.ones_like(row_ids)).float(), -1)[0]
            (result,) = outputs[(task, i)][-1].results
            torch.testing.assert_close(result.probs, expected, rtol=0, atol=1e-5, msg=f"{task} {i}")


def on_output(outputs: list[EngineOutput], output: EngineOutput) -> None:
    outputs.append(output)


def test_the_self_check_finds_deberta_v3s_position_projections_at_start(deberta_v3: dict[str, Any]) -> None:
    engine = Engine(deberta_v3["backbone"], EngineConfig(device="cpu", dtype="float32", kv_cache_bytes=1 << 24))
    self_check(engine)
    layers = range(deberta_v3["backbone"].fingerprint.num_layers)
    expected = {f"deberta.encoder.layer.{i}.attention.self.{p}_proj" for i in layers for p in ("query", "key")}
    assert set(engine.tasks.adapters.hooks.unservable) == expected
    outputs: list[EngineOutput] = []
    sinks = [partial(on_output, outputs)]
    engine.add_all(plan_classify(ClassifyInput(("hi",), ("queries",)), engine.backbone, deberta_v3["store"], LIMITS,
                                 sinks).requests)  # fmt: skip
    while engine.has_work():
        engine.step()
    assert isinstance(outputs[-1].error, UnservableTarget)  # refused at load, before any pass
    assert engine.tasks.adapters.resident == {}
