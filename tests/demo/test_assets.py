"""The shipped demo backbone and tasks load through the standard Hugging Face and PEFT paths."""

from __future__ import annotations

import json

import pytest
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from server.demo import ADAPTER_CONFIG, ADAPTER_MODEL, DEMO_BACKBONE_DIR, DEMO_TASKS
from server.demo.tasks import DEMO_TASK_SPECS, encode_example
from server.engine.default_backbone import (
    BOS_ID,
    EOS_ID,
    PRETRAINED_BACKBONE_DIR,
    byte_tokenizer,
    default_backbone_config,
    ensure_default_backbone,
    ensure_random_backbone,
)

PEFT_TYPES = {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING"}


@pytest.fixture(scope="module")
def backbone() -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(DEMO_BACKBONE_DIR)


def test_backbone_loads_through_from_pretrained_as_a_gqa_llama(backbone: PreTrainedModel) -> None:
    config = backbone.config
    assert config.model_type == "llama"
    assert config.num_key_value_heads < config.num_attention_heads


def test_backbone_shape_matches_the_default_config(backbone: PreTrainedModel) -> None:
    expected = default_backbone_config()
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert getattr(backbone.config, field) == getattr(expected, field), field


def test_tokenizer_loads_and_encodes_like_the_byte_tokenizer() -> None:
    tokenizer = AutoTokenizer.from_pretrained(DEMO_BACKBONE_DIR)
    text = "Hello, wörld!"
    assert tokenizer(text).input_ids == byte_tokenizer()(text).input_ids == [BOS_ID, *text.encode()]
    assert tokenizer.eos_token_id == EOS_ID


def test_training_examples_start_with_what_the_server_feeds() -> None:
    ids, loss_start = encode_example("", "hello world", "HELLO WORLD")
    assert ids[:loss_start] == byte_tokenizer()("hello world").input_ids
    assert ids[loss_start] == BOS_ID and ids[-1] == EOS_ID


def test_ensure_default_backbone_returns_the_pretrained_assets(tmp_path) -> None:
    assert ensure_default_backbone(tmp_path) == PRETRAINED_BACKBONE_DIR == DEMO_BACKBONE_DIR
    assert not any(tmp_path.iterdir())  # nothing written into the cache


def test_random_fallback_still_loads_through_from_pretrained(tmp_path) -> None:
    path = ensure_random_backbone(tmp_path)
    assert ensure_random_backbone(tmp_path) == path  # created once
    assert AutoModelForCausalLM.from_pretrained(path).config.hidden_size == default_backbone_config().hidden_size


def test_demo_task_ids_match_the_training_specs() -> None:
    assert list(DEMO_TASKS) == [task.task_id for task in DEMO_TASK_SPECS]


def test_demo_tasks_include_prompt_and_prefix_rows() -> None:
    methods = {task.method for task in DEMO_TASK_SPECS}
    assert "prefix_tuning" in methods and methods & {"prompt_tuning", "p_tuning"}


@pytest.mark.parametrize("task", DEMO_TASK_SPECS, ids=lambda t: t.task_id)
def test_demo_adapter_is_exactly_the_peft_layout(task) -> None:
    directory = DEMO_TASKS[task.task_id]
    assert sorted(p.name for p in directory.iterdir()) == [ADAPTER_CONFIG, ADAPTER_MODEL]
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == PEFT_TYPES[task.method]
    assert config["num_virtual_tokens"] == task.num_virtual_tokens
    assert config["base_model_name_or_path"] == "promptserve/default"


@pytest.mark.parametrize("task", DEMO_TASK_SPECS, ids=lambda t: t.task_id)
def test_demo_adapter_loads_with_peft(task) -> None:
    directory = DEMO_TASKS[task.task_id]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_BACKBONE_DIR), directory)
    assert model.peft_config["default"].peft_type.value == PEFT_TYPES[task.method]
    assert PeftConfig.from_pretrained(directory).num_virtual_tokens == task.num_virtual_tokens


def test_every_asset_ships_as_package_data() -> None:
    import tomllib

    root = PRETRAINED_BACKBONE_DIR.parents[2]  # the `server` package
    pyproject = tomllib.loads((root.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["server"]
    shipped = {path for pattern in patterns for path in root.glob(pattern) if path.is_file()}
    assets = {path for path in (root / "demo" / "assets").rglob("*") if path.is_file()}
    assert assets and assets <= shipped
