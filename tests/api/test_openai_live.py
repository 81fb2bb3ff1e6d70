"""The official `openai` package, sync and async, against a real server (the real engine on a tiny Llama with a chat
template) through a real port: the OpenAI routes answer what /v1/generate answers, on the same engine."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.api.settings import Settings
from tests.fixtures import TinyBackbone, with_chat_template
from tests.live_server import live_server

TASKS = ("prompt_tuning", "prefix")


@pytest.fixture(scope="module")
def chat_backbone(tiny_llama: TinyBackbone, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a chat template in its tokenizer_config.json, as chat models ship it."""
    return with_chat_template(tiny_llama.path, tmp_path_factory.mktemp("chat") / "llama")


@pytest.fixture(scope="module")
def url(chat_backbone: Path, tiny_llama: TinyBackbone, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(
        model=str(chat_backbone),
        store_dir=str(tmp_path_factory.mktemp("openai-store")),
        demo_tasks=False,
        served_model_name="tiny",
        max_batch_size=8,
        poll_interval_s=0,
        log_level="critical",
    )
    with live_server(settings) as base_url:
        for kind in TASKS:
            adapter = tiny_llama.adapters[kind]
            files = {name: (adapter / f"{name}{ext}").read_bytes() for name, ext in
                     (("adapter_config", ".json"), ("adapter_model", ".safetensors"))}  # fmt: skip
            httpx.put(f"{base_url}/v1/tasks/{kind}", files=files, timeout=60).raise_for_status()
        yield base_url


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def generate(url: str, inputs: str, **body) -> dict:
    parameters = {"max_new_tokens": 12, "details": True, **body.pop("parameters", {})}
    response = httpx.post(f"{url}/v1/generate", json={"inputs": inputs, **body, "parameters": parameters}, timeout=60)
    response.raise_for_status()
    return response.json()


@pytest.mark.parametrize(("model", "task_id"), [("prompt_tuning", "prompt_tuning"), ("tiny:prefix", "prefix"),
                                                ("tiny", None)])  # fmt: skip
def test_greedy_completions_equal_generate_token_for_token(client, url, model, task_id):
    completion = client.completions.create(model=model, prompt="hello there", max_tokens=12, temperature=0, logprobs=0)
    native = generate(url, "hello there", task_id=task_id)
    assert completion.choices[0].text == native["generated_text"]
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.token_logprobs == pytest.approx([t["logprob"] for t in native["details"]["tokens"]], abs=1e-6)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == native["details"]["input_tokens"]
    assert completion.usage.completion_tokens == native["details"]["generated_tokens"]


def test_top_logprobs_are_the_backbones_own(client, chat_backbone: Path):
    """The bare backbone's first-position alternatives, against a plain transformers forward."""
    completion = client.completions.create(model="tiny", prompt="abc", max_tokens=1, temperature=0, logprobs=5)
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.top_logprobs is not None
    tokenizer = AutoTokenizer.from_pretrained(chat_backbone)
    model = AutoModelForCausalLM.from_pretrained(chat_backbone, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer("abc")["input_ids"]])).logits[0, -1]
    values, ids = torch.log_softmax(logits, dim=-1).topk(5)
    expected: dict[str, float] = {}
    for i, value in zip(ids.tolist(), values.tolist(), strict=True):
        expected.setdefault(tokenizer.decode([i]), value)  # bytes that are no character share a text: the likelier
    top = logprobs.top_logprobs[0]
    assert len(top) <= 6
    for text, value in expected.items():
        assert top[text] == pytest.approx(value, abs=1e-4)
    assert logprobs.token_logprobs[0] == pytest.approx(max(expected.values()), abs=1e-4)


def test_n_sampled_choices_are_seeded_and_reproducible(client):
    def texts(**kwargs) -> list[str]:
        completion = client.completions.create(
            model="prefix", prompt="seed me", max_tokens=10, temperature=1.0, **kwargs
        )
        return [choice.text for choice in completion.choices]

    three = texts(n=3, seed=11)
    assert three == texts(n=3, seed=11)
    assert len(set(three)) > 1
    assert texts(seed=12) == [three[1]]  # choice i samples with seed + i


def test_more_prompts_than_the_batch_size_queue_and_answer_each_as_alone(client):
    """lm-evaluation-harness sends --batch_size prompts in one request (64 is common): the choices queue for rows, as
    vLLM's do, and each answers what it answers alone (the server's batch size is 8)."""
    prompts = [f"prompt number {i}" for i in range(12)]
    for stream in (False, True):
        together = client.completions.create(model="prefix", prompt=prompts, max_tokens=6, temperature=0,
                                             stream=stream)  # fmt: skip
        texts = [""] * len(prompts)
        for chunk in together if stream else [together]:
            for choice in chunk.choices:
                texts[choice.index] += choice.text
        alone = [client.completions.create(model="prefix", prompt=p, max_tokens=6, temperature=0).choices[0].text
                 for p in prompts]  # fmt: skip
        assert texts == alone


def test_streaming_adds_up_to_the_answer_and_ends_with_usage(client):
    full = client.completions.create(model="prompt_tuning", prompt="stream", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(
        model="prompt_tuning", prompt="stream", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    assert "".join(c.text for chunk in chunks for c in chunk.choices) == full.choices[0].text
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage == full.usage


def test_stop_sequences_cut_the_text_and_the_stream_agrees(client):
    text = client.completions.create(model="tiny", prompt="xyz", max_tokens=12, temperature=0).choices[0].text
    stop = text[3:5]
    assert len(stop) == 2, "the tiny backbone's answer is too short to cut"
    cut = client.completions.create(model="tiny", prompt="xyz", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="tiny", prompt="xyz", max_tokens=12, temperature=0, stop=stop, stream=True)
    assert "".join(c.text for chunk in chunks for c in chunk.choices) == cut.choices[0].text


def test_an_ensemble_through_extra_body_equals_generate(client, url):
    members = ["prompt_tuning", "prefix", "prompt_tuning"]
    for mode in ("vote", "mean"):
        completion = client.completions.create(
            model="tiny", prompt="vote", max_tokens=8, temperature=0, extra_body={"task_ids": members, "ensemble": mode}
        )
        native = generate(url, "vote", task_ids=members, ensemble=mode, parameters={"max_new_tokens": 8})
        assert completion.choices[0].text == native["generated_text"]


def test_chat_tokenizes_the_rendered_template_once(client, url, chat_backbone: Path):
    messages = [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="prefix", messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                          top_logprobs=2)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(chat_backbone)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert prompt_ids.count(tokenizer.bos_token_id) == 1
    assert chat.usage is not None and chat.usage.prompt_tokens == len(prompt_ids)
    choice = chat.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert all(len(token.top_logprobs) == 2 for token in choice.logprobs.content)
    pieces = [token.token for token in choice.logprobs.content]
    whole = next((i for i, piece in enumerate(pieces) if "\ufffd" in piece), len(pieces))  # a byte of a character
    assert choice.message.content.startswith("".join(pieces[:whole]))  # each piece alone shows U+FFFD for it
    assert whole < len(pieces) or choice.message.content == "".join(pieces)


def test_chat_refused_by_the_template_is_400(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="prefix", messages=[{"role": "tool", "content": "x"}])
    assert "unexpected role tool" in raised.value.message


def test_models_follow_registrations_and_deletions(client, url, tiny_llama: TinyBackbone):
    assert {m.id for m in client.models.list()} >= {"tiny", *TASKS}
    adapter = tiny_llama.adapters["p_tuning_mlp"]
    files = {"adapter_config": (adapter / "adapter_config.json").read_bytes(),
             "adapter_model": (adapter / "adapter_model.safetensors").read_bytes()}  # fmt: skip
    httpx.put(f"{url}/v1/tasks/fresh", files=files, timeout=60).raise_for_status()
    card = client.models.retrieve("fresh").model_dump()
    assert card["method"] == "p_tuning" and card["parent"] == "tiny" and card["version"] == 1
    assert client.completions.create(model="fresh", prompt="x", max_tokens=2, temperature=0).choices
    httpx.delete(f"{url}/v1/tasks/fresh", timeout=30).raise_for_status()
    assert "fresh" not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="fresh", prompt="x", max_tokens=2)


def test_the_async_client_streams_chat_and_runs_completions_concurrently(url):
    async def run() -> tuple[list[str], str, str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
            completions = await asyncio.gather(*(
                client.completions.create(model=task, prompt="together", max_tokens=6, temperature=0)
                for task in (*TASKS, "tiny")
            ))  # fmt: skip
            messages = [{"role": "user", "content": "hello"}]
            stream = await client.chat.completions.create(
                model="prompt_tuning", messages=messages, max_tokens=6, temperature=0, stream=True
            )
            streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
            whole = await client.chat.completions.create(
                model="prompt_tuning", messages=messages, max_tokens=6, temperature=0
            )
            return [c.choices[0].text for c in completions], streamed, whole.choices[0].message.content or ""

    texts, streamed, whole = asyncio.run(run())
    alone = [generate(url, "together", task_id=task, parameters={"max_new_tokens": 6})["generated_text"]
             for task in (*TASKS, None)]  # fmt: skip
    assert texts == alone  # batched together, each as if alone
    assert streamed == whole


def test_chat_prompt_logprobs_score_the_rendered_conversation(client, chat_backbone: Path):
    """vLLM's prompt_logprobs on chat: the template's tokens, each against the bare backbone's own forward."""
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, temperature=0,
                                          extra_body={"prompt_logprobs": 1})  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(chat_backbone)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(chat_backbone, dtype=torch.float32)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    entries = chat.model_extra["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    for position in range(1, len(ids)):
        expected = float(logprobs[position - 1, ids[position]])
        assert entries[position][str(ids[position])]["logprob"] == pytest.approx(expected, abs=1e-4)
