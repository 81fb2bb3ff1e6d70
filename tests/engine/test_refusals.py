"""Every causal-LM class of the installed transformers is either served (its attention runs through the engine's) or
refused in one line that names the architecture, the reason and where the served list is: never a bare KeyError,
a traceback or an internal name. Each class is built tiny from its own config class (random weights, CPU)."""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from server.engine import alibi
from server.engine.attention import ATTENTION_NAME, KV_KWARG, unrouted_attention
from server.engine.backbone import SERVED_LIST, refuse_unbuildable
from server.engine.default_backbone import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID
from server.engine.errors import UnsupportedBackbone

TINY = {
    "vocab_size": BYTE_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": 1,  # within every family's position tables (RoBERTa-likes count positions from it)
}
DROP = object()  # an override that removes a TINY field the family's config refuses
OVERRIDES: dict[str, dict[str, Any]] = {
    "gpt_neo": {"num_layers": 2, "attention_types": [[["global", "local"], 1]]},
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1, "state_size": 16},
    "prophetnet": {"num_hidden_layers": DROP, "num_encoder_layers": 2, "num_decoder_layers": 2},
    "xlnet": {"max_position_embeddings": DROP, "d_head": 16},
    "reformer": {"is_decoder": True, "axial_pos_shape": [16, 32], "axial_pos_embds_dim": [32, 32]},
}
MAX_PARAMETERS = 10_000_000  # a config whose sub-models keep full-size defaults is not built here
# Causal-LM classes whose modeling code never calls the AttentionInterface, yet which no tiny config builds here.
NOT_BUILT_TINY = {
    "gemma4_unified_assistant": "composite: its audio and vision towers keep full-size defaults",
    "got_ocr2": "composite: its vision tower keeps full-size defaults",
    "gemma4_assistant": "a drafting assistant built around a Gemma-4 text config, not served alone",
}
ONE_LINE = re.compile(r"^\w+: [^\n]+; " + re.escape(SERVED_LIST) + "$")


def tiny_config(model_type: str) -> PretrainedConfig | None:
    fields = {**TINY, **OVERRIDES.get(model_type, {})}
    try:
        config = CONFIG_MAPPING[model_type](**{k: v for k, v in fields.items() if v is not DROP})
    except Exception:  # the family's config refuses these sizes: not a class this test can build
        return None
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    return config


def attends_through_the_interface(class_name: str) -> bool:
    """Whether the class's modeling code calls transformers' attention functions at all (read from its source)."""
    source = inspect.getsource(inspect.getmodule(getattr(transformers, class_name)))  # type: ignore[arg-type]
    return "ALL_ATTENTION_FUNCTIONS" in source or "AttentionInterface" in source


def verdict(config: PretrainedConfig) -> str | NotBuilt | None:
    """What load_backbone decides for this config (None: served), without the weights on disk; NOT_BUILT where the
    tiny config builds on the meta device but not with real weights (the family's own limits, not ours to judge)."""
    own = alibi.stock_attention(config)  # a family whose attention layers the engine wraps (Bloom, Falcon, MPT)
    try:
        if (reason := alibi.refusal(config)) is not None:
            return f"{config.architectures[0]}: {reason}; {SERVED_LIST}"
        if own is None:
            refuse_unbuildable(config, AutoModelForCausalLM, trust_remote_code=False)
    except UnsupportedBackbone as refusal:
        return str(refusal)
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=own or ATTENTION_NAME).eval()
    except Exception:
        return NOT_BUILT
    if own is not None:
        alibi.install(model)
    reason = unrouted_attention(model, alibi.num_kv_heads(config))
    return None if reason is None else f"{config.architectures[0]}: {reason}; {SERVED_LIST}"


class NotBuilt:
    pass


NOT_BUILT = NotBuilt()


def small_enough(config: PretrainedConfig) -> bool:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) <= MAX_PARAMETERS


def buildable(model_type: str) -> PretrainedConfig | None:
    config = tiny_config(model_type)
    try:
        return config if config is not None and small_enough(config) else None
    except Exception:  # the family's model refuses the tiny config
        return None


CAUSAL_TYPES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
NON_INTERFACE = [t for t in CAUSAL_TYPES if not attends_through_the_interface(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[t])]


@pytest.fixture(autouse=True)
def quiet_transformers() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.mark.parametrize("model_type", NON_INTERFACE)
def test_a_class_outside_the_attention_interface_is_refused_in_one_line(model_type: str):
    config = buildable(model_type)
    if config is None:
        assert model_type in NOT_BUILT_TINY, f"{model_type}: no tiny config builds it; give it an OVERRIDES entry"
        pytest.skip(NOT_BUILT_TINY[model_type])
    refusal = verdict(config)
    assert refusal is not NOT_BUILT, f"{model_type}: its tiny config does not build; give it an OVERRIDES entry"
    if isinstance(refusal, str):  # a composite model whose text model attends through the interface may be served
        assert ONE_LINE.match(refusal), refusal
        assert "Error" not in refusal and KV_KWARG not in refusal and repr(ATTENTION_NAME) not in refusal


def test_every_causal_class_that_builds_tiny_is_served_or_refused_in_one_line():
    outcomes = {"served": 0, "refused": 0}
    for model_type in CAUSAL_TYPES:
        config = buildable(model_type)
        if config is None:
            continue
        refusal = verdict(config)
        if refusal is NOT_BUILT:
            continue
        if refusal is None:
            outcomes["served"] += 1
        else:
            assert isinstance(refusal, str) and ONE_LINE.match(refusal), refusal
            assert "Error" not in refusal and KV_KWARG not in refusal and repr(ATTENTION_NAME) not in refusal
            outcomes["refused"] += 1
    assert outcomes["served"] >= 20 and outcomes["refused"] >= 10, outcomes
