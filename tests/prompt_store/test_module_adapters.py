"""The store's side of LoRA and IA3 tasks (issue 27): adapters as PEFT's save_pretrained writes them, their target
modules resolved on the backbone as PEFT resolves them, and what is not served refused with the setting named."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, LlamaConfig

from prompt_store.adapter import StoreLimits, parse_adapter
from prompt_store.errors import InvalidTask
from prompt_store.registry import TaskStore
from prompt_store.targets import targets_of
from prompt_store.types import BackboneFingerprint, IA3Weights, LoraWeights, Method
from server.engine.backbone import load_backbone, module_shapes
from tests.fixtures import tiny_gpt2_config, tiny_llama_config, write_strong_backbone
from tests.lora_fixtures import lora_config, write_module_adapter
from tests.nlu_fixtures import NUM_LABELS, nlu_config
from tests.seq2seq_fixtures import tiny_t5_config


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("module-adapters")
    return {
        "llama": write_strong_backbone(tiny_llama_config(), root / "llama", seed=1),
        "gpt2": write_strong_backbone(tiny_gpt2_config(), root / "gpt2", seed=2),
        "t5": write_strong_backbone(tiny_t5_config(), root / "t5", seed=3, auto=AutoModelForSeq2SeqLM),
        "bert": write_strong_backbone(
            nlu_config("bert"), root / "bert", seed=4, auto=AutoModelForSequenceClassification
        ),
    }


AUTO = {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM, "t5": AutoModelForSeq2SeqLM,
        "bert": AutoModelForSequenceClassification}  # fmt: skip
TASK_TYPES = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}


@pytest.fixture(scope="module")
def fingerprints(backbones: dict[str, Path]) -> dict[str, BackboneFingerprint]:
    return {arch: load_backbone(str(path), "cpu", "float32").fingerprint for arch, path in backbones.items()}


def adapter(backbones: dict[str, Path], tmp_path: Path, arch: str, method: str = "lora", **settings: Any) -> Path:
    return write_module_adapter(backbones[arch], method, tmp_path / f"{arch}-{method}", seed=5, auto=AUTO[arch],
                                task_type=TASK_TYPES[arch], **settings)  # fmt: skip


def parse(directory: Path, fp: BackboneFingerprint, limits: StoreLimits | None = None, **edits: Any) -> Any:
    config = {**json.loads((directory / "adapter_config.json").read_bytes()), **edits}
    model = (directory / "adapter_model.safetensors").read_bytes()
    return parse_adapter(json.dumps(config).encode(), model, fp, limits or StoreLimits())


def peft_modules(backbones: dict[str, Path], arch: str, method: str, **settings: Any) -> dict[str, Any]:
    """PEFT's own choice: module name -> its adapted layer."""
    model = get_peft_model(
        AUTO[arch].from_pretrained(backbones[arch]), lora_config(method, TASK_TYPES[arch], **settings)
    )
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A" if method == "lora" else "ia3_l") and name.startswith(prefix)
    }


TARGETS = [
    ("llama", {"target_modules": ["q_proj", "v_proj"]}),
    ("llama", {"target_modules": r".*\.(up|down)_proj"}),
    ("llama", {"target_modules": ["o_proj", "gate_proj"], "layers_to_transform": [1]}),
    ("llama", {"target_modules": ["k_proj"], "layers_to_transform": 0, "layers_pattern": "layers"}),
    ("llama", {"target_modules": ["q_proj", "k_proj"], "exclude_modules": ["model.layers.0.self_attn.q_proj"]}),
    ("gpt2", {"target_modules": ["c_attn", "c_proj"]}),
    ("t5", {"target_modules": ["q", "v", "wo"]}),
    ("bert", {"target_modules": ["query", "value", "dense"]}),
]


@pytest.mark.parametrize(("arch", "settings"), TARGETS)
def test_target_modules_are_those_peft_chooses(
    backbones: dict[str, Path], fingerprints: dict[str, BackboneFingerprint], arch: str, settings: dict[str, Any]
) -> None:
    config = lora_config("lora", TASK_TYPES[arch], **settings)
    names = [module.name for module in fingerprints[arch].modules]
    peft_choice = [name for name in names if check_target_module_exists(config, name)]  # excluded ones are falsy
    saved = {key: sorted(v) if isinstance(v, set) else v for key, v in config.to_dict().items()}  # as saved: lists
    assert targets_of(saved, names) == peft_choice
    assert set(peft_choice) == set(peft_modules(backbones, arch, "lora", **settings))


def test_a_lora_adapter_keeps_each_modules_rank_and_peft_scaling(
    backbones: dict[str, Path], fingerprints: dict[str, BackboneFingerprint], tmp_path: Path
) -> None:
    settings = {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 8,
                "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}}  # fmt: skip
    content = parse(adapter(backbones, tmp_path, "llama", **settings), fingerprints["llama"])
    peft = peft_modules(backbones, "llama", "lora", **settings)
    assert content.method is Method.LORA and content.num_virtual_tokens == 0 and content.rank == 4
    assert [m.module for m in content.modules] == list(peft)
    for module in content.modules:
        assert isinstance(module, LoraWeights)
        assert (module.rank, module.scaling) == (
            peft[module.module].r["default"],
            peft[module.module].scaling["default"],
        )


def test_rslora_scales_by_the_root_of_the_rank(
    backbones: dict[str, Path], fingerprints: dict[str, BackboneFingerprint], tmp_path: Path
) -> None:
    settings = {"target_modules": ["q_proj"], "r": 4, "lora_alpha": 8, "use_rslora": True}
    content = parse(adapter(backbones, tmp_path, "llama", **settings), fingerprints["llama"])
    assert {m.scaling for m in content.modules} == {8 / 2}


def test_gpt2_conv1d_modules_take_lora_with_fan_in_fan_out(
    backbones: dict[str, Path], fingerprints: dict[str, BackboneFingerprint], tmp_path: Path
) -> None:
    directory = adapter(backbones, tmp_path, "gpt2", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    content = parse(directory, fingerprints["gpt2"])
    c_attn = next(m for m in content.modules if m.module.endswith("attn.c_attn"))
    assert isinstance(c_attn, LoraWeights)
    assert (tuple(c_attn.lora_a.shape), tuple(c_attn.lora_b.shape)) == ((4, 32), (96, 4))  # Conv1D weight [32, 96]


def test_ia3_scales_outputs_and_feedforward_inputs(
    backbones: dict[str, Path], fingerprints: dict[str, BackboneFingerprint], tmp_path: Path
) -> None:
    settings = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    content = parse(adapter(backbones, tmp_path, "llama", "ia3", **settings), fingerprints["llama"])
    assert content.method is Method.IA3 and content.rank is None
    shapes = {m.module.rsplit(".", 1)[-1]: (m.is_feedforward, m.scales.numel()) for m in content.modules
              if isinstance(m, IA3Weights)}  # fmt: skip
    assert shapes == {"k_proj": (False, 16), "v_proj": (False, 16), "down_proj": (True, 96)}


def test_a_seq_cls_lora_on_an_encoder_carries_its_classifier(
    backbones: dict[str, Path], fingerprints: dict[str, BackboneFingerprint], tmp_path: Path
) -> None:
    content = parse(adapter(backbones, tmp_path, "bert", target_modules=["query", "value"]), fingerprints["bert"])
    assert content.task_type == "SEQ_CLS" and content.labels == tuple(f"LABEL_{i}" for i in range(NUM_LABELS))
    assert set(content.head) == {"classifier.weight", "classifier.bias"}
    assert not any("classifier" in m.module for m in content.modules)


def test_lora_on_t5_reaches_encoder_and_decoder(
    backbones: dict[str, Path], fingerprints: dict[str, BackboneFingerprint], tmp_path: Path
) -> None:
    content = parse(adapter(backbones, tmp_path, "t5", target_modules=["q", "v"]), fingerprints["t5"])
    assert {m.module.split(".")[0] for m in content.modules} == {"encoder", "decoder"}


REFUSALS = [
    ({"use_dora": True}, "use_dora"),
    ({"bias": "all"}, "bias"),
    ({"lora_bias": True}, "lora_bias"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"some_future_option": {"on": True}}, "some_future_option"),
    ({"target_modules": ["embed_tokens"]}, "embeddings"),
    ({"target_modules": ["input_layernorm"]}, "RMSNorm"),
    ({"target_modules": ["lm_head"]}, "output layer"),
    ({"target_modules": ["no_such_module"]}, "none matched"),
    ({"target_modules": "(unclosed"}, "regular expression"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"r": 0}, "positive integer"),
    ({"rank_pattern": {"q_proj": 2.5}}, r"rank_pattern\['q_proj'\] must be a positive integer; found 2.5"),
    ({"rank_pattern": [1]}, "rank_pattern must be an object"),  # each of these six was a 500
    ({"rank_pattern": "x"}, "rank_pattern must be an object"),
    ({"rank_pattern": 5}, "rank_pattern must be an object"),
    ({"alpha_pattern": [1]}, "alpha_pattern must be an object"),
    ({"alpha_pattern": "x"}, "alpha_pattern must be an object"),
    ({"alpha_pattern": 5}, "alpha_pattern must be an object"),
]


@pytest.mark.parametrize(("edits", "named"), REFUSALS)
def test_what_is_not_served_is_refused_naming_the_setting(
    backbones: dict[str, Path], fingerprints: dict[str, BackboneFingerprint], tmp_path: Path,
    edits: dict[str, Any], named: str,
) -> None:  # fmt: skip
    directory = adapter(backbones, tmp_path, "llama", target_modules=["q_proj", "v_proj"])
    with pytest.raises(InvalidTask, match=named):
        parse(directory, fingerprints["llama"], **edits)


def test_a_rank_above_the_servers_maximum_is_refused_with_both_numbers(
    backbones: dict[str, Path], fingerprints: dict[str, BackboneFingerprint], tmp_path: Path
) -> None:
    directory = adapter(backbones, tmp_path, "llama", target_modules=["q_proj"], r=16)
    with pytest.raises(InvalidTask, match=r"max_lora_rank 8 .*found rank 16"):
        parse(directory, fingerprints["llama"], StoreLimits(max_lora_rank=8))


def test_a_rank_pattern_above_the_servers_maximum_names_the_module_pattern(
    backbones: dict[str, Path], fingerprints: dict[str, BackboneFingerprint], tmp_path: Path
) -> None:
    directory = adapter(backbones, tmp_path, "llama", target_modules=["q_proj", "v_proj"], r=4,
                        rank_pattern={"v_proj": 16})  # fmt: skip
    with pytest.raises(
        InvalidTask, match=r"rank_pattern\['v_proj'\] must be at most .*max_lora_rank 8 .*found rank 16"
    ):
        parse(directory, fingerprints["llama"], StoreLimits(max_lora_rank=8))


def test_layers_to_transform_past_the_backbones_layers_names_the_setting_and_the_layers(
    backbones: dict[str, Path], fingerprints: dict[str, BackboneFingerprint], tmp_path: Path
) -> None:
    directory = adapter(backbones, tmp_path, "llama", target_modules=["q_proj"], layers_to_transform=[0])
    with pytest.raises(InvalidTask, match=r"layers_to_transform must be .*\[0, 1\].*found \[5\]"):
        parse(directory, fingerprints["llama"], layers_to_transform=[5])


def test_an_adapter_of_another_base_model_says_so(
    backbones: dict[str, Path], fingerprints: dict[str, BackboneFingerprint], tmp_path: Path
) -> None:
    """The same module names on a wider or deeper backbone: the shapes (or the layers) name the mismatch."""
    wider_config = LlamaConfig(**{**tiny_llama_config().to_dict(), "hidden_size": 96})
    wider = write_strong_backbone(wider_config, tmp_path / "wider", seed=6)
    directory = write_module_adapter(wider, "lora", tmp_path / "wide-lora", seed=5, target_modules=["q_proj"])
    message = r"must have shape \[4, 48\]; found \[4, 96\]: an adapter of another base model \('.*wider'\)\?"
    with pytest.raises(InvalidTask, match=message):
        parse(directory, fingerprints["llama"], r=4)
    deeper_config = LlamaConfig(**{**tiny_llama_config().to_dict(), "num_hidden_layers": 3})
    deeper = write_strong_backbone(deeper_config, tmp_path / "deeper", seed=7)
    directory = write_module_adapter(deeper, "lora", tmp_path / "deep-lora", seed=5, target_modules=["q_proj"])
    with pytest.raises(InvalidTask, match=r"unexpected \[.*layers\.2\..*another base model.*has 2 layers"):
        parse(directory, fingerprints["llama"])


def edited_tensors(directory: Path, edit: Any) -> bytes:
    tensors = load_safetensors((directory / "adapter_model.safetensors").read_bytes())
    edit(tensors)
    return save_safetensors(tensors)


@pytest.mark.parametrize(
    ("edit", "found"),
    [
        (lambda t: t.pop(sorted(t)[0]), "missing"),
        (lambda t: t.update(extra=torch.zeros(2)), "unexpected"),
        (lambda t: t.update({sorted(t)[0]: torch.zeros(4, 7)}), "must have shape"),
        (lambda t: t[sorted(t)[0]].fill_(float("nan")), "finite"),
        (lambda t: t.update({sorted(t)[0]: t[sorted(t)[0]].to(torch.int32)}), "float dtype"),
    ],
)
def test_tensors_that_do_not_fit_the_target_modules_are_refused(
    backbones: dict[str, Path], fingerprints: dict[str, BackboneFingerprint], tmp_path: Path, edit: Any, found: str
) -> None:
    directory = adapter(backbones, tmp_path, "llama", target_modules=["q_proj", "v_proj"])
    config = (directory / "adapter_config.json").read_bytes()
    with pytest.raises(InvalidTask, match=found):
        parse_adapter(config, edited_tensors(directory, edit), fingerprints["llama"], StoreLimits())


def test_a_lora_task_is_registered_listed_replaced_and_read_back(
    backbones: dict[str, Path], fingerprints: dict[str, BackboneFingerprint], tmp_path: Path
) -> None:
    store = TaskStore(tmp_path / "store", fingerprints["llama"])
    first = adapter(backbones, tmp_path / "a", "llama", target_modules=["q_proj"], r=4)
    second = adapter(backbones, tmp_path / "b", "llama", target_modules=["q_proj", "v_proj"], r=8)
    files = [(d / "adapter_config.json").read_bytes() for d in (first, second)]
    models = [(d / "adapter_model.safetensors").read_bytes() for d in (first, second)]
    assert store.register("summarise", files[0], models[0])[0].to_dict()["rank"] == 4
    record, created = store.register("summarise", files[1], models[1])
    assert (record.version, record.method, record.rank, record.num_virtual_tokens, created) == (2, Method.LORA, 8, 0,
                                                                                                False)  # fmt: skip
    reopened = TaskStore(tmp_path / "store", fingerprints["llama"])  # read back from disk and validated again
    artifact = reopened.load("summarise")
    assert (artifact.record.rank, len(artifact.modules)) == (8, 4)
    assert artifact.nbytes == sum(t.nbytes for t in load_safetensors(models[1]).values())  # its [0, H] prompt: none
    assert [r.to_dict()["method"] for r in reopened.list()] == ["lora"]


def test_a_mixtures_expert_layers_are_refused_targets(fingerprints: dict[str, BackboneFingerprint]) -> None:
    """Per-expert linear layers (older MoE code) see only their routed tokens: the fingerprint marks them."""
    experts = torch.nn.Module()
    experts.add_module("experts", torch.nn.ModuleList([torch.nn.Linear(48, 48) for _ in range(2)]))
    shapes = module_shapes(experts)
    fp = replace(fingerprints["llama"], modules=(*fingerprints["llama"].modules, *shapes))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "target_modules": ["experts.0"]}
    with pytest.raises(InvalidTask, match="expert sees only the tokens routed to it"):
        parse_adapter(json.dumps(config).encode(), save_safetensors({}), fp, StoreLimits())
