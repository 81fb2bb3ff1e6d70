"""An encoder-decoder backbone served over HTTP (issue 12): `/info` says so, PEFT SEQ_2_SEQ_LM adapters register
and answer as the uncached reference over PEFT's forward does, through /v1/generate and the OpenAI route; an
adapter of the other kind is a 422 naming both kinds, both ways."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from server.api.settings import Settings
from tests.fixtures import TinyBackbone
from tests.live_server import live_server
from tests.seq2seq_fixtures import build_tiny_seq2seq_backbone, greedy_seq2seq_reference, load_seq2seq_peft

NEW_TOKENS = 8


def files(adapter: Path) -> dict[str, bytes]:
    return {"adapter_config": (adapter / "adapter_config.json").read_bytes(),
            "adapter_model": (adapter / "adapter_model.safetensors").read_bytes()}  # fmt: skip


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> TinyBackbone:
    return build_tiny_seq2seq_backbone("t5", tmp_path_factory.mktemp("s2s-http"))


@pytest.fixture(scope="module")
def url(t5: TinyBackbone, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(model=str(t5.path), store_dir=str(tmp_path_factory.mktemp("s2s-store")), demo_tasks=False,
                        poll_interval_s=0, log_level="critical")  # fmt: skip
    with live_server(settings) as base_url:
        yield base_url


def test_info_says_seq2seq(url: str):
    assert httpx.get(f"{url}/info").json()["model_kind"] == "seq2seq"


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix"])
def test_a_registered_task_answers_as_the_reference(url: str, t5: TinyBackbone, kind: str):
    httpx.put(f"{url}/v1/tasks/{kind}", files=files(t5.adapters[kind]), timeout=60).raise_for_status()
    body = {"inputs": "hello there", "task_id": kind, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}}
    answer = httpx.post(f"{url}/v1/generate", json=body, timeout=60).json()
    model = load_seq2seq_peft(t5.path, t5.adapters[kind])
    input_ids = AutoTokenizer.from_pretrained(t5.path)("hello there")["input_ids"]
    expected = greedy_seq2seq_reference(model, input_ids, NEW_TOKENS, model.config.eos_token_id)
    assert [token["id"] for token in answer["details"]["tokens"]] == expected
    completion = httpx.post(f"{url}/v1/completions", json={"model": kind, "prompt": "hello there",
                            "max_tokens": NEW_TOKENS, "temperature": 0}, timeout=60).json()  # fmt: skip
    assert completion["choices"][0]["text"] == answer["generated_text"]


def test_a_causal_adapter_is_refused_naming_both_kinds(url: str, tiny_llama: TinyBackbone):
    response = httpx.put(f"{url}/v1/tasks/causal", files=files(tiny_llama.adapters["prompt_tuning"]), timeout=60)
    assert response.status_code == 422
    assert "SEQ_2_SEQ_LM" in response.json()["error"] and "CAUSAL_LM" in response.json()["error"]


def test_a_seq2seq_adapter_on_a_causal_server_is_refused(t5: TinyBackbone, tiny_llama: TinyBackbone, tmp_path: Path):
    settings = Settings(model=str(tiny_llama.path), store_dir=str(tmp_path / "store"), demo_tasks=False,
                        poll_interval_s=0, log_level="critical")  # fmt: skip
    with live_server(settings) as causal_url:
        assert httpx.get(f"{causal_url}/info").json()["model_kind"] == "causal"
        response = httpx.put(f"{causal_url}/v1/tasks/s2s", files=files(t5.adapters["prompt_tuning"]), timeout=60)
    assert response.status_code == 422
    assert "CAUSAL_LM" in response.json()["error"] and "SEQ_2_SEQ_LM" in response.json()["error"]


def test_a_stream_carries_the_same_tokens(url: str, t5: TinyBackbone):
    httpx.put(f"{url}/v1/tasks/streamed", files=files(t5.adapters["p_tuning_mlp"]), timeout=60).raise_for_status()
    body = {"inputs": "stream me", "task_id": "streamed", "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}}
    whole = httpx.post(f"{url}/v1/generate", json=body, timeout=60).json()
    with httpx.stream("POST", f"{url}/v1/generate_stream", json=body, timeout=60) as response:
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert [event["token"]["id"] for event in events] == [token["id"] for token in whole["details"]["tokens"]]
    assert events[-1]["generated_text"] == whole["generated_text"]


def test_echo_with_logprobs_is_a_clear_400_on_an_encoder_decoder(url: str):
    """Its prompt is the encoder's input: no token of it has a log-probability (lm-evaluation-harness's
    loglikelihood requests get this answer)."""
    body = {"model": model_name(url), "prompt": [5, 6, 7], "max_tokens": 1, "echo": True, "logprobs": 1}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert "causal backbone" in response.json()["error"]["message"] and "seq2seq" in response.json()["error"]["message"]


def test_a_token_id_prompt_answers_as_its_text_on_an_encoder_decoder(url: str, t5: TinyBackbone):
    ids = AutoTokenizer.from_pretrained(t5.path)("hello there")["input_ids"]
    answers = [
        httpx.post(
            f"{url}/v1/completions",
            json={"model": model_name(url), "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0},
            timeout=60,
        ).json()["choices"][0]["text"]
        for prompt in ("hello there", ids)
    ]
    assert answers[0] == answers[1]


def model_name(url: str) -> str:
    return httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
