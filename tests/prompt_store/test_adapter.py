"""Validation of PEFT adapters against the backbone: every kind accepted, every malformed upload refused."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from prompt_store.adapter import TASK_ID_PATTERN, StoreLimits, parse_adapter, validate_task_id
from prompt_store.errors import InvalidTask, TaskTooLarge
from prompt_store.types import BackboneFingerprint, Method
from tests.fixtures import ADAPTER_KINDS, VIRTUAL_TOKENS, TinyBackbone
from tests.prompt_store.helpers import adapter_parts, config_bytes, fingerprint_of, model_bytes, pickled_bytes

METHODS = {
    "prompt_tuning": Method.PROMPT_TUNING,
    "p_tuning_mlp": Method.P_TUNING,
    "p_tuning_lstm": Method.P_TUNING,
    "prefix": Method.PREFIX_TUNING,
    "prefix_projection": Method.PREFIX_TUNING,
}


@pytest.fixture(scope="module")
def prompt_parts(tiny_llama: TinyBackbone) -> tuple[dict, torch.Tensor]:
    return adapter_parts(tiny_llama.adapters["prompt_tuning"])  # [5, 48]


@pytest.fixture(scope="module")
def prefix_parts(tiny_llama: TinyBackbone) -> tuple[dict, torch.Tensor]:
    return adapter_parts(tiny_llama.adapters["prefix"])  # [3, 2 layers * 2 * 2 kv heads * 8]


def refuse(fp: BackboneFingerprint, config: dict, model: bytes, limits: StoreLimits = StoreLimits()) -> str:
    with pytest.raises(InvalidTask) as info:
        parse_adapter(config_bytes(config), model, fp, limits)
    return str(info.value)


def with_fields(config: dict, **fields: object) -> dict:
    changed = copy.deepcopy(config)
    changed.update(fields)
    return changed


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_parse_adapter_accepts_every_peft_kind(tiny_backbone: TinyBackbone, kind: str):
    fp = fingerprint_of(tiny_backbone.path)
    config, tensor = adapter_parts(tiny_backbone.adapters[kind])
    content = parse_adapter(config_bytes(config), model_bytes(tensor), fp, StoreLimits())
    parsed_config, parsed, method = content.config, content.prompt, content.method
    assert (content.task_type, content.head, content.labels) == ("CAUSAL_LM", {}, None)
    width = fp.num_layers * 2 * fp.kv_dim if method.is_prefix else fp.hidden_size
    assert method is METHODS[kind]
    assert parsed.shape == (VIRTUAL_TOKENS[kind], width)
    assert torch.equal(parsed, tensor) and parsed_config == config


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_parse_adapter_accepts_float_dtype_other_than_float32(llama_fp, prompt_parts, dtype):
    config, tensor = prompt_parts
    parsed = parse_adapter(config_bytes(config), model_bytes(tensor.to(dtype)), llama_fp, StoreLimits()).prompt
    assert parsed.dtype == dtype


def test_parse_adapter_refuses_tensor_of_wrong_hidden_size(llama_fp, prompt_parts):
    config, tensor = prompt_parts
    message = refuse(llama_fp, config, model_bytes(tensor[:, :47]))
    assert "[5, 48]" in message and "[5, 47]" in message


def test_parse_adapter_refuses_config_token_dim_of_another_model(llama_fp, prompt_parts):
    config, tensor = prompt_parts
    message = refuse(llama_fp, with_fields(config, token_dim=64), model_bytes(tensor))
    assert "token_dim must be 48" in message and "found 64" in message


def test_parse_adapter_refuses_prefix_with_wrong_layer_count(llama_fp, prefix_parts):
    config, tensor = prefix_parts
    deeper = torch.cat([tensor, tensor[:, :32]], dim=1)  # [3, 3 layers * 2 * 16]
    message = refuse(llama_fp, with_fields(config, num_layers=3), model_bytes(deeper))
    assert "num_layers must be 2" in message and "found 3" in message


def test_parse_adapter_refuses_prefix_tensor_of_wrong_width(llama_fp, prefix_parts):
    config, tensor = prefix_parts
    message = refuse(llama_fp, config, model_bytes(torch.cat([tensor, tensor], dim=1)))
    assert "[3, 64]" in message and "[3, 128]" in message


def test_parse_adapter_refuses_gqa_prefix_sized_by_query_heads(llama_fp, prefix_parts):
    # The classic PEFT GQA bug: a prefix sized with 6 query heads (token_dim 48) instead of 2 KV heads.
    config, tensor = prefix_parts
    wide = tensor.repeat(1, 3)  # [3, 2 * 2 * 48]
    message = refuse(llama_fp, with_fields(config, token_dim=48, num_attention_heads=6), model_bytes(wide))
    assert "token_dim must be 16" in message and "num_key_value_heads 2" in message and "found 48" in message


def test_parse_adapter_refuses_prefix_heads_that_are_not_kv_heads(llama_fp, prefix_parts):
    config, tensor = prefix_parts
    message = refuse(llama_fp, with_fields(config, num_attention_heads=6), model_bytes(tensor))
    assert "num_attention_heads must be 2" in message and "found 6" in message


@pytest.mark.parametrize("peft_type", ["LOHA", "ADALORA", "MULTITASK_PROMPT_TUNING", None, ["PROMPT_TUNING"], {}])
def test_parse_adapter_refuses_unsupported_peft_type(llama_fp, prompt_parts, peft_type):
    config, tensor = prompt_parts
    message = refuse(llama_fp, with_fields(config, peft_type=peft_type), model_bytes(tensor))
    assert "PROMPT_TUNING, P_TUNING, PREFIX_TUNING, LORA, IA3" in message and repr(peft_type) in message


@pytest.mark.parametrize("task_type", ["SEQ_2_SEQ_LM", "SEQ_CLS", None])
def test_parse_adapter_refuses_task_type_other_than_causal_lm(llama_fp, prompt_parts, task_type):
    config, tensor = prompt_parts
    message = refuse(llama_fp, with_fields(config, task_type=task_type), model_bytes(tensor))
    assert "'CAUSAL_LM'" in message and repr(task_type) in message


def test_parse_adapter_refuses_two_transformer_submodules(llama_fp, prompt_parts):
    config, tensor = prompt_parts
    doubled = torch.cat([tensor, tensor])  # [2 * 5, 48]: an encoder-decoder prompt
    message = refuse(llama_fp, with_fields(config, num_transformer_submodules=2), model_bytes(doubled))
    assert "num_transformer_submodules must be 1" in message and "found 2" in message


def test_parse_adapter_refuses_virtual_tokens_disagreeing_with_tensor(llama_fp, prompt_parts):
    config, tensor = prompt_parts
    message = refuse(llama_fp, with_fields(config, num_virtual_tokens=4), model_bytes(tensor))
    assert "[4, 48]" in message and "[5, 48]" in message


@pytest.mark.parametrize("value", [0, -3, 2.5, "5", True])
def test_parse_adapter_refuses_virtual_tokens_that_are_not_positive_ints(llama_fp, prompt_parts, value):
    config, tensor = prompt_parts
    message = refuse(llama_fp, with_fields(config, num_virtual_tokens=value), model_bytes(tensor))
    assert "positive integer" in message and repr(value) in message


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_parse_adapter_refuses_non_finite_values(llama_fp, prompt_parts, bad):
    config, tensor = prompt_parts
    poisoned = tensor.clone()
    poisoned[2, 7] = bad
    message = refuse(llama_fp, config, model_bytes(poisoned))
    assert "finite" in message and "found 1 NaN or Inf" in message


def test_parse_adapter_refuses_more_virtual_tokens_than_limit(llama_fp, prompt_parts):
    config, tensor = prompt_parts
    with pytest.raises(TaskTooLarge, match="at most 4; found 5"):
        parse_adapter(config_bytes(config), model_bytes(tensor), llama_fp, StoreLimits(max_virtual_tokens=4))


def test_parse_adapter_refuses_model_file_over_size_limit(llama_fp, prompt_parts):
    config, tensor = prompt_parts
    model = model_bytes(tensor)
    limits = StoreLimits(max_model_bytes=len(model) - 1)
    with pytest.raises(TaskTooLarge, match=f"at most {len(model) - 1} bytes; found {len(model)}"):
        parse_adapter(config_bytes(config), model, llama_fp, limits)


def test_parse_adapter_refuses_config_file_over_size_limit(llama_fp, prompt_parts):
    config, tensor = prompt_parts
    padded = config_bytes(with_fields(config, padding="x" * 2000))
    with pytest.raises(TaskTooLarge, match=f"at most 1024 bytes; found {len(padded)}"):
        parse_adapter(padded, model_bytes(tensor), llama_fp, StoreLimits(max_config_bytes=1024))


def test_parse_adapter_refuses_pickle_without_unpickling(llama_fp, prompt_parts, monkeypatch):
    config, tensor = prompt_parts
    for unpickler in ("pickle.loads", "pickle.load", "torch.load"):
        monkeypatch.setattr(unpickler, lambda *a, **k: pytest.fail("unpickled an upload"))
    message = refuse(llama_fp, config, pickled_bytes(tensor))
    assert "safetensors" in message and "found a PyTorch pickle" in message and "safe_serialization" in message


@pytest.mark.parametrize("model", [b"", b"\x01\x02", b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"])
def test_parse_adapter_refuses_bytes_that_are_not_safetensors(llama_fp, prompt_parts, model):
    config, _ = prompt_parts
    assert "expected a safetensors" in refuse(llama_fp, config, model)


def test_parse_adapter_refuses_truncated_safetensors(llama_fp, prompt_parts):
    config, tensor = prompt_parts
    message = refuse(llama_fp, config, model_bytes(tensor)[:-16])
    assert "expected a valid safetensors file" in message


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[1, 2]",
        b"\xff\xfe\x00",
        b'"PROMPT_TUNING"',
        b"[" * 50_000,
        b'{"num_virtual_tokens": ' + b"9" * 5000 + b"}",
    ],
    ids=["malformed", "array", "not-utf8", "string", "deeply-nested", "over-long-integer"],
)
def test_parse_adapter_refuses_config_that_is_not_a_json_object(llama_fp, prompt_parts, raw):
    _, tensor = prompt_parts
    with pytest.raises(InvalidTask, match="expected a JSON object; found"):
        parse_adapter(raw, model_bytes(tensor), llama_fp, StoreLimits())


def test_parse_adapter_refuses_missing_prompt_embeddings_key(llama_fp, prompt_parts):
    config, tensor = prompt_parts
    message = refuse(llama_fp, config, model_bytes(tensor, key="base_model.prompt_encoder.weight"))
    assert "'prompt_embeddings'" in message and "['base_model.prompt_encoder.weight']" in message


def test_parse_adapter_refuses_extra_tensors(llama_fp, prompt_parts):
    config, tensor = prompt_parts
    message = refuse(llama_fp, config, model_bytes(tensor, extra=torch.zeros(2)))
    assert "exactly one tensor 'prompt_embeddings'" in message and "['extra', 'prompt_embeddings']" in message


@pytest.mark.parametrize(("dtype", "code"), [(torch.int64, "I64"), (torch.int8, "I8"), (torch.bool, "BOOL")])
def test_parse_adapter_refuses_non_float_dtype(llama_fp, prompt_parts, dtype, code):
    config, tensor = prompt_parts
    message = refuse(llama_fp, config, model_bytes(tensor.to(dtype)))
    assert "float dtype" in message and repr(code) in message


@pytest.mark.parametrize("shape", [(240,), (5, 48, 1)])
def test_parse_adapter_refuses_tensor_that_is_not_2d(llama_fp, prompt_parts, shape):
    config, tensor = prompt_parts
    message = refuse(llama_fp, config, model_bytes(tensor.reshape(shape)))
    assert "2-D" in message and str(list(shape)) in message


@pytest.mark.parametrize("task_id", ["sentiment", "A", "a.b_c-d", "0" * 128, "v2.1"])
def test_validate_task_id_accepts_pattern(task_id):
    assert validate_task_id(task_id) == task_id


@pytest.mark.parametrize("task_id", ["", "-a", ".hidden", "..", "a/b", "a b", "a\n", "é", "x" * 129, None])
def test_validate_task_id_refuses_names_outside_pattern(task_id):
    with pytest.raises(InvalidTask) as info:
        validate_task_id(task_id)
    assert TASK_ID_PATTERN in str(info.value) and repr(task_id) in str(info.value)
