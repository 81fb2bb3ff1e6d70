"""The OpenAI-compatible routes against the fake engine, through the official `openai` client (TestClient is an
httpx.Client, so the client runs its real code over the app): model resolution, /v1/models, the error shape and
the client's exception types, retries, and the stream's framing."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from prompt_store.errors import LookupThrottled, TaskNotFound
from prompt_store.types import TaskRecord
from server.api.app import create_app
from server.api.settings import Settings
from tests.api.fake_engine import FakeEngine, answer_of
from tests.api.helpers import metric_samples

BACKBONE = "fake/tiny"


@pytest.fixture
def engine() -> FakeEngine:
    fake = FakeEngine(has_chat_template=True)
    for task_id in ("upper", "reverse", "other"):
        fake.add_task(task_id)
    return fake


@pytest.fixture
def http(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(demo_tasks=False, max_batch_size=8), engine)) as client:
        yield client


@pytest.fixture
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="unused", http_client=http, max_retries=2)


# ---- model resolution


@pytest.mark.parametrize(
    ("model", "task_id"),
    [("upper", "upper"), (f"{BACKBONE}:upper", "upper"), (BACKBONE, None), (f"{BACKBONE}:reverse", "reverse")],
)
def test_model_names_a_task_or_the_bare_backbone(client: openai.OpenAI, engine: FakeEngine, model, task_id):
    completion = client.completions.create(model=model, prompt="hello", max_tokens=20, temperature=0)
    assert completion.choices[0].text == answer_of(task_id, "hello")
    assert completion.model == model
    assert engine.requests[-1].task_ids == (task_id,)


@pytest.mark.parametrize("model", ["nope", f"{BACKBONE}:nope", "other-backbone:upper", "bad id!"])
def test_an_unknown_model_is_404_model_not_found(client: openai.OpenAI, model: str):
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model=model, prompt="hello")
    error = raised.value
    assert error.code == "model_not_found" and error.param == "model"
    assert BACKBONE in error.message and repr(model) in error.message


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": "elsewhere", "prompt": "hi"}),
        ("/v1/chat/completions", {"model": "elsewhere", "messages": [{"role": "user", "content": "hi"}]}),
    ],
)
def test_a_model_looked_up_in_the_store_blocks_no_other_request(http: TestClient, engine, monkeypatch, path, body):
    # A replica asks the shared store about an id it does not know (an S3 request): the event loop goes on serving.
    asked, release = threading.Event(), threading.Event()

    def slow_lookup(task_id: str) -> TaskRecord:
        asked.set()
        release.wait(10)
        raise TaskNotFound(task_id)

    monkeypatch.setattr(engine, "get_task", slow_lookup)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, path, json=body)
        assert asked.wait(5)
        started = time.monotonic()
        health = http.get("/health")
        elapsed = time.monotonic() - started
        release.set()
        assert pending.result().status_code == 404
    assert health.status_code == 200 and elapsed < 5


def test_models_lists_the_backbone_and_every_task_the_instant_they_change(client: openai.OpenAI, engine):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {BACKBONE, "upper", "reverse", "other"}
    backbone, upper = models[BACKBONE].model_dump(), models["upper"].model_dump()
    assert backbone["parent"] is None and backbone["root"] == BACKBONE and backbone["owned_by"] == "promptserve"
    assert upper["parent"] == BACKBONE and upper["version"] == 1 and upper["method"] == "prompt_tuning"
    assert upper["num_virtual_tokens"] == engine.tasks["upper"].num_virtual_tokens
    assert isinstance(upper["created"], int) and upper["created"] > 1_700_000_000
    engine.add_task("fresh")
    assert "fresh" in {m.id for m in client.models.list()}
    assert client.models.retrieve("fresh").id == "fresh"
    assert client.models.retrieve(BACKBONE).id == BACKBONE
    engine.delete_task("fresh")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("fresh")


def documented_card_fields() -> set[str]:
    """The field names docs/api.md lists for a /v1/models card."""
    contract = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    listing = contract[contract.index("lists the backbone and every generation task, each as") :].split("}`", 1)[0]
    return set(re.findall(r'"(\w+)"', listing))


def test_a_model_card_answers_exactly_the_documented_fields(http: TestClient):
    cards = http.get("/v1/models").json()["data"]
    assert [set(card) for card in cards] == [documented_card_fields()] * 4


def test_served_model_name_renames_the_backbone(engine: FakeEngine):
    with TestClient(create_app(Settings(demo_tasks=False, served_model_name="base"), engine)) as http:
        client = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="unused", http_client=http)
        assert "base" in {m.id for m in client.models.list()}
        text = client.completions.create(model="base:upper", prompt="hi", temperature=0, max_tokens=8).choices[0].text
        assert text == answer_of("upper", "hi")


# ---- requests


def test_a_list_of_prompts_times_n_in_openai_order_with_usage(client: openai.OpenAI, engine: FakeEngine):
    completion = client.completions.create(model="upper", prompt=["ab", "cde"], n=2, max_tokens=20, temperature=0)
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    ab, cde = answer_of("upper", "ab"), answer_of("upper", "cde")
    assert [c.text for c in completion.choices] == [ab, ab, cde, cde]
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == (2 + 1) + (3 + 1)  # once per prompt, not per choice (the fake adds one token)
    assert usage.completion_tokens == 2 * (len(ab) + 1) + 2 * (len(cde) + 1)  # every choice, EOS included
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert [r.sampling.seed for r in engine.requests[-4:]] == [None] * 4


def test_seeds_of_choices_follow_the_request_seed(client: openai.OpenAI, engine: FakeEngine):
    client.completions.create(model="upper", prompt="ab", n=3, seed=7, temperature=0.8, top_p=0.9, max_tokens=4)
    sampling = [r.sampling for r in engine.requests[-3:]]
    assert [s.seed for s in sampling] == [7, 8, 9]
    assert all(s.do_sample and s.temperature == 0.8 and s.top_p == 0.9 for s in sampling)


def test_openai_defaults_sample_and_temperature_zero_is_greedy(client: openai.OpenAI, engine: FakeEngine):
    client.completions.create(model="upper", prompt="ab")
    assert engine.requests[-1].sampling.do_sample and engine.requests[-1].sampling.temperature == 1.0
    client.completions.create(model="upper", prompt="ab", temperature=0)
    assert not engine.requests[-1].sampling.do_sample


def test_finish_reasons_are_stop_and_length(client: openai.OpenAI):
    assert client.completions.create(model="upper", prompt="ab", max_tokens=20).choices[0].finish_reason == "stop"
    assert client.completions.create(model="upper", prompt="abc", max_tokens=2).choices[0].finish_reason == "length"


def test_echo_prepends_the_prompt(client: openai.OpenAI):
    text = client.completions.create(model="upper", prompt="ab", echo=True, max_tokens=20).choices[0].text
    assert text == "ab" + answer_of("upper", "ab")


def test_an_ensemble_through_extra_body(client: openai.OpenAI, engine: FakeEngine):
    completion = client.completions.create(
        model=BACKBONE, prompt="abc", temperature=0, extra_body={"task_ids": ["upper", "reverse", "upper"]}
    )
    assert completion.choices[0].text == answer_of("upper", "abc")  # the vote
    assert engine.requests[-1].task_ids == ("upper", "reverse", "upper")
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="upper", prompt="abc", extra_body={"task_ids": ["upper"]})
    assert raised.value.param == "model"


# ---- errors in OpenAI's shape


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 100_000}, "max_tokens"),
        ({"prompt": "x", "n": 1025}, "n"),  # past the waiting queue (1024)
        ({"prompt": ["a", "b", "c"], "n": 342}, "n"),
        ({"prompt": ["a"] * 600, "echo": True, "logprobs": 1}, "prompt"),  # and their scoring
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "logit_bias": {"1": 2.0}}, "logit_bias"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x", "stop": ["s"] * 17}, "stop"),
        ({"prompt": "x", "stop": "s" * 1025}, "stop"),
        ({"prompt": ["a"] * 1025}, "prompt"),
        ({"prompt": "x", "task_ids": ["upper"] * 9, "model": BACKBONE}, "task_ids"),
        ("not json", None),
        ({}, "prompt"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(client: openai.OpenAI, body: dict | str, param: str | None):
    with pytest.raises(openai.BadRequestError) as raised:
        client.post("/completions", body=body if isinstance(body, str) else {"model": "upper", **body}, cast_to=object)
    error = raised.value
    assert error.status_code == 400 and error.type == "invalid_request_error"
    assert error.param == param
    assert "expected" in error.message and "found" in error.message


def test_error_bodies_have_openai_shape_and_say_when_not_to_retry(http: TestClient):
    response = http.post("/v1/completions", json={"model": "upper", "prompt": "x", "n": 0})
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response.headers["x-should-retry"] == "false"
    native = http.post("/v1/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 0}})
    assert native.status_code == 422 and set(native.json()) == {"error", "error_type"}  # elsewhere: the native shape


def test_an_input_too_long_is_context_length_exceeded(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="upper", prompt="x" * 500)
    assert raised.value.code == "context_length_exceeded" and raised.value.param == "prompt"


def test_a_full_queue_is_a_rate_limit_error_with_retry_after(client: openai.OpenAI, http: TestClient, engine):
    engine.queue_full = True
    response = http.post("/v1/completions", json={"model": "upper", "prompt": "x"})
    assert response.status_code == 429 and response.headers["retry-after"] == "3"
    assert "x-should-retry" not in response.headers
    with pytest.raises(openai.RateLimitError):
        client.with_options(max_retries=0).completions.create(model="upper", prompt="x")


def test_an_internal_error_is_not_retried(client: openai.OpenAI, engine: FakeEngine):
    engine.crash_with = RuntimeError("boom")
    with pytest.raises(openai.InternalServerError) as raised:
        client.completions.create(model="upper", prompt="x")
    assert "boom" not in raised.value.message
    assert len(engine.started) == 1  # x-should-retry: false, despite max_retries=2


def test_unavailable_while_loading_is_503_with_retry_after(engine: FakeEngine):
    engine.ready = False
    with TestClient(create_app(Settings(demo_tasks=False), engine)) as http:
        response = http.get("/v1/models")
    assert response.status_code == 503 and response.headers["retry-after"]
    assert response.json()["error"]["type"] == "server_error"


def test_unknown_routes_under_models_and_wrong_methods_use_the_openai_shape(http: TestClient):
    response = http.get("/v1/completions")
    assert response.status_code == 405 and "error" in response.json() and "message" in response.json()["error"]


# ---- streams


def test_a_stream_adds_up_to_the_answer_with_usage_last(client: openai.OpenAI):
    stream = client.completions.create(
        model="upper",
        prompt=["ab", "xyz"],
        n=2,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=20,
    )
    chunks = list(stream)
    texts: dict[int, str] = {}
    reasons = {}
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    ab, xyz = answer_of("upper", "ab"), answer_of("upper", "xyz")
    assert texts == {0: ab, 1: ab, 2: xyz, 3: xyz}
    assert reasons == dict.fromkeys(range(4), "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2 * (len(ab) + 1) + 2 * (len(xyz) + 1)


def test_the_stream_is_data_only_and_ends_with_done(http: TestClient):
    with http.stream("POST", "/v1/completions", json={"model": "upper", "prompt": "ab", "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_an_error_after_the_stream_started_is_raised_by_the_client(client: openai.OpenAI, engine: FakeEngine):
    engine.fail_after_tokens = 1
    with pytest.raises(openai.APIError) as raised:
        list(client.completions.create(model="upper", prompt="abcdef", stream=True))
    assert "simulated" in raised.value.message


def test_an_early_stream_error_keeps_its_status(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="ab", stream=True)


def test_a_failing_choice_closes_the_others(client: openai.OpenAI, engine: FakeEngine):
    engine.fail_after_tokens = 2
    with pytest.raises(openai.InternalServerError):  # 503: the engine step failed
        client.with_options(max_retries=0).completions.create(model="upper", prompt="abcdef", n=3)
    assert len(engine.aborted) + len(engine.completed) == len(engine.started) == 3


# ---- chat


def test_chat_renders_the_template_and_tokenizes_without_adding_specials(client: openai.OpenAI, engine):
    chat = client.chat.completions.create(
        model="upper",
        messages=[
            {"role": "system", "content": "be loud"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        temperature=0,
        max_tokens=50,
    )
    request = engine.requests[-1]
    assert request.inputs == "<system>be loud\n<user>hi\n<assistant>"
    assert not request.add_special_tokens
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == answer_of("upper", request.inputs)
    assert chat.object == "chat.completion" and chat.usage is not None


def test_chat_streams_a_role_then_content(client: openai.OpenAI):
    chunks = list(client.chat.completions.create(
        model="upper", messages=[{"role": "user", "content": "ab"}], temperature=0, stream=True, n=2
    ))  # fmt: skip
    roles = [c.choices[0].delta.role for c in chunks if c.choices[0].delta.role]
    assert roles == ["assistant", "assistant"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == 1)
    assert text == answer_of("upper", "<user>ab\n<assistant>")


def test_chat_without_a_template_is_400(engine: FakeEngine):
    engine.has_chat_template = False
    with TestClient(create_app(Settings(demo_tasks=False), engine)) as http:
        client = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="unused", http_client=http)
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model="upper", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.code == "no_chat_template" and "chat template" in raised.value.message


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"response_format": {"type": "json_object"}},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"messages": []},
        {"top_logprobs": 2},
    ],
)
def test_chat_refuses_what_it_cannot_do(client: openai.OpenAI, extra: dict):
    body = {"model": "upper", "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(openai.BadRequestError):
        client.post("/chat/completions", body=body, cast_to=object)


def test_no_task_may_take_the_backbones_name(engine: FakeEngine):
    with TestClient(create_app(Settings(demo_tasks=False, served_model_name="base"), engine)) as http:
        files = {"adapter_config": b"{}", "adapter_model": b"x"}
        response = http.put("/v1/tasks/base", files=files)
    assert response.status_code == 409 and response.json()["error_type"] == "conflict"
    assert "base" not in engine.tasks


def test_nulls_mean_the_defaults(client: openai.OpenAI, engine: FakeEngine):
    body = {"model": "upper", "prompt": "ab", "n": None, "stream": None, "echo": None, "ensemble": None,
            "temperature": 0, "top_k": -1, "max_tokens": 20}  # fmt: skip
    completion = client.post("/completions", body=body, cast_to=object)
    assert completion["choices"][0]["text"] == answer_of("upper", "ab")  # type: ignore[index]
    assert engine.requests[-1].sampling.top_k == 0


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", '{"model": "upper", "prompt": "x \\ud800"}', "prompt"),
        ("/v1/chat/completions", '{"model": "upper", "messages": [{"role": "user", "content": [{"type": "text", '
         '"text": "hi \\ud800 there"}]}]}', "messages"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_400_not_500(http: TestClient, path: str, body: str, param: str):
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert "surrogate" in response.json()["error"]["message"]


PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids (no list empty)"
STOP_SHAPES = "a string of 1 to 1024 characters or a list of at most 16 of them"
CONTENT_SHAPES = (
    'a string, null or a list of text parts {"type": "text", "text": <string>} (this server reads text only)'
)
HI = [{"role": "user", "content": "hi"}]
FIFTEEN_STOPS = '"s", ' * 15


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/completions", {"prompt": [[]]}, f"prompt: expected {PROMPT_SHAPES}; found [[]]"),
        ("/v1/completions", {"prompt": [1, "a"]}, f'prompt: expected {PROMPT_SHAPES}; found [1, "a"]'),
        ("/v1/completions", {"prompt": [[1], [2, "x"]]}, f'prompt: expected {PROMPT_SHAPES}; found [[1], [2, "x"]]'),
        ("/v1/completions", {"prompt": 5}, f"prompt: expected {PROMPT_SHAPES}; found 5"),
        ("/v1/completions", {"prompt": "x", "stop": ""}, f'stop: expected {STOP_SHAPES}; found ""'),
        ("/v1/completions", {"prompt": "x", "stop": [1]}, f"stop: expected {STOP_SHAPES}; found [1]"),
        ("/v1/completions", {"prompt": "x", "stop": "s" * 1025},
         f'stop: expected {STOP_SHAPES}; found "{"s" * 76}... (1025 characters)'),
        ("/v1/completions", {"prompt": "x", "stop": ["s"] * 17},
         f"stop: expected {STOP_SHAPES}; found [{FIFTEEN_STOPS}\"... (17 items)"),
        ("/v1/chat/completions", {"messages": HI, "stop": ""}, f'stop: expected {STOP_SHAPES}; found ""'),
        ("/v1/completions", {"prompt_embeds": []}, "prompt_embeds: expected a base64 string or a non-empty list of "
         "them; found []"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
         f'messages.0.content: expected {CONTENT_SHAPES}; found [{{"type": "image_url", "image_url": "x"}}]'),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]},
         f"messages.0.content: expected {CONTENT_SHAPES}; found 3"),
        ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
         f'messages.0.content: expected {CONTENT_SHAPES}; found [{{"type": "text"}}]'),
        # the more specific refusals stay as they were
        ("/v1/completions", {"prompt": []}, "prompt: expected a string, token ids, or a non-empty list of either; "
         "found []"),
        ("/v1/completions", {"prompt": ["a", "b\ud800"]}, "prompt.1: expected valid Unicode text; found a lone "
         "surrogate '\\ud800' at character 1 (a JSON \\ud800-\\udfff escape that is not half of a pair)"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
         "messages.0.content.0.text: expected valid Unicode text; found a lone surrogate '\\ud800' at character 0 "
         "(a JSON \\ud800-\\udfff escape that is not half of a pair)"),
    ],
)  # fmt: skip
def test_a_field_of_several_shapes_refuses_in_one_message(http: TestClient, path: str, body: dict, message: str):
    """One message naming the shapes the field takes, not one per member of its union with pydantic's names."""
    body = {"model": "upper", **body}  # json.dumps escapes a lone surrogate as JSON may (\ud800)
    response = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == message
    assert response.json()["error"]["param"] == message.split(":")[0].split(".")[0]


def test_max_completion_tokens_wins_over_max_tokens(client: openai.OpenAI, engine: FakeEngine):
    client.chat.completions.create(model="upper", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                   max_completion_tokens=5)  # fmt: skip
    assert engine.requests[-1].sampling.max_new_tokens == 5
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="upper", messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=100_000)  # fmt: skip
    assert raised.value.param == "max_completion_tokens"


def test_retrieve_answers_with_the_name_asked_for(client: openai.OpenAI):
    assert client.models.retrieve(f"{BACKBONE}:upper").id == f"{BACKBONE}:upper"


def test_an_unknown_model_is_counted(http: TestClient, client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    metrics = http.get("/metrics").text
    labels = (("endpoint", "completions"), ("outcome", "not_found"), ("task", "_other"))
    assert metric_samples(metrics)[("promptserve_requests_total", labels)] == 1


def test_an_unknown_model_the_store_cannot_be_asked_about_is_503_and_counted(http: TestClient, engine, monkeypatch):
    def throttled(task_id: str) -> TaskRecord:
        raise LookupThrottled(f"task {task_id!r} is not known to this replica; retry shortly")

    monkeypatch.setattr(engine, "get_task", throttled)
    response = http.post("/v1/completions", json={"model": "elsewhere", "prompt": "x"})
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    metrics = http.get("/metrics").text
    labels = (("endpoint", "completions"), ("outcome", "unavailable"), ("task", "_other"))
    assert metric_samples(metrics)[("promptserve_requests_total", labels)] == 1


def test_a_long_stop_costs_no_more_than_its_held_back_text():
    from server.api.openai_generation import held_back

    assert held_back("hello wor", ("world",)) == 3
    assert held_back("hello", ("xyz",)) == 0
    assert held_back("aaaa", ("a" * 1024,)) == 4
    assert held_back("ab", ("abc", "bcd")) == 2


# ---- vLLM's extensions, at the edge


def test_prompt_embeds_are_refused_unless_enabled(http: TestClient):
    response = http.post("/v1/completions", json={"model": "upper", "prompt_embeds": "AAAA"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt_embeds"
    assert "--enable-prompt-embeds" in response.json()["error"]["message"]


def test_unknown_fields_are_ignored_and_each_name_is_logged_once(http: TestClient, caplog: pytest.LogCaptureFixture):
    caplog.set_level("WARNING", logger="server.api.openai_schemas")
    for _ in range(3):
        body = {"model": "upper", "prompt": "x", "max_tokens": 2, "a_field_nobody_knows": 1}
        assert http.post("/v1/completions", json=body).status_code == 200
    logged = [r.getMessage() for r in caplog.records if "a_field_nobody_knows" in r.getMessage()]
    assert len(logged) == 1 and "CompletionRequest" in logged[0]


def test_tokenize_max_model_len_leaves_room_for_the_task(http: TestClient, engine: FakeEngine):
    bare = http.post("/tokenize", json={"prompt": "ab"}).json()
    task = http.post("/tokenize", json={"prompt": "ab", "model": "upper"}).json()
    assert bare["tokens"] == [257, 97, 98] and bare["count"] == 3
    assert bare["max_model_len"] - task["max_model_len"] == engine.get_task("upper").num_virtual_tokens > 0


def test_tokenize_messages_go_through_the_chat_template(http: TestClient, engine: FakeEngine):
    messages = [{"role": "user", "content": "hi"}]
    tokens = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    assert tokens == engine.tokenize("<user>hi\n<assistant>", add_special_tokens=False)
    engine.has_chat_template = False
    response = http.post("/tokenize", json={"messages": messages})
    assert response.status_code == 400 and "chat template" in response.json()["error"]["message"]


def test_echo_logprobs_start_with_null_and_count_the_prompt(http: TestClient):
    body = {"model": "upper", "prompt": "ab", "max_tokens": 2, "echo": True, "logprobs": 0}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["logprobs"]["token_logprobs"][:3] == [None, -0.5, -0.5]
    assert choice["text"].startswith("ab")


def test_unknown_stream_options_are_logged_once(http: TestClient, caplog: pytest.LogCaptureFixture):
    """guidellm sends vLLM's stream_options.continuous_usage_stats: ignored, and said so once."""
    caplog.set_level("WARNING", logger="server.api.openai_schemas")
    options = {"include_usage": True, "an_option_nobody_knows": True}
    for _ in range(2):
        body = {"model": "upper", "prompt": "x", "max_tokens": 2, "stream": True, "stream_options": options}
        assert http.post("/v1/completions", json=body).status_code == 200
    logged = [r.getMessage() for r in caplog.records if "an_option_nobody_knows" in r.getMessage()]
    assert len(logged) == 1 and "StreamOptions" in logged[0]


def test_text_offsets_skip_what_the_text_leaves_out():
    from server.api.openai_schemas import text_offsets

    assert text_offsets(["<s>", "h", "i"], "hi") == [0, 0, 1]
    assert text_offsets(["\ufffd", "\ufffd", " ", "a"], "é a") == [0, 0, 1, 2]  # one character, two byte tokens
    assert text_offsets(["a", "<s>", "b"], "ab") == [0, 1, 1]
