"""The Ray application's ingress (server/ray_ingress.py) without a Ray cluster: a fake engine deployment whose
replicas answer through a real app, die before answering, or die mid-stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from starlette.types import Message

ray = pytest.importorskip("ray")
from ray.exceptions import ActorDiedError  # noqa: E402  (needs ray: skipped above without it)

from server.ray_ingress import MULTIPLEXED_HEADER, ForwardedRequest, Relay, call_asgi  # noqa: E402


def engine_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/generate")
    async def generate(body: dict[str, str]) -> dict[str, str]:
        return {"generated_text": body["inputs"].upper()}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/generate_stream")
    async def stream() -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            for token in ("a", "b"):
                yield f"data: {token}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions", response_model=None)
    async def complete(body: dict[str, object]) -> StreamingResponse | dict[str, object]:
        if body.get("stream"):
            return await stream()
        choice = {"index": 0, "text": "HI", "finish_reason": "length", "logprobs": None}
        return {"id": "c1", "object": "text_completion", "created": 0, "model": "m", "choices": [choice]}

    @app.put("/v1/tasks/{task_id}")
    async def register(task_id: str) -> dict[str, str]:
        return {"id": task_id}

    return app


class FakeEngines:
    """Replicas tried in turn: each either dies at once, dies after `die_after` messages, or answers."""

    def __init__(self, *plans: int | None, app: FastAPI | None = None) -> None:
        self.plans = list(plans)  # per call: None answers, n dies after n messages (0: before any)
        self.app = app or engine_app()
        self.calls: list[tuple[str, str]] = []

    async def forward(self, request: ForwardedRequest, task_id: str) -> AsyncIterator[list[Message]]:
        self.calls.append((request.path, task_id))
        die_after = self.plans.pop(0) if self.plans else None
        sent = 0
        messages = [message async for batch in call_asgi(self.app, request) for message in batch]
        for message in messages:
            if sent == die_after:
                raise ActorDiedError()
            yield [message]
            sent += 1
        if die_after is not None and sent <= die_after:
            raise ActorDiedError()


def client(relay: Relay) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=relay), base_url="http://ingress")


def run(call: Callable[[httpx.AsyncClient], object], relay: Relay) -> httpx.Response:
    async def go() -> httpx.Response:
        async with client(relay) as http:
            return await call(http)  # type: ignore[misc, no-any-return]

    return asyncio.run(go())


def test_a_request_is_answered_by_a_replica_through_its_app_with_the_task_id_for_the_router() -> None:
    engines = FakeEngines(None)
    response = run(lambda http: http.post("/v1/generate", json={"inputs": "hi"}, headers={MULTIPLEXED_HEADER: "t1"}),
                   Relay(engines.forward))  # fmt: skip
    assert response.status_code == 200 and response.json() == {"generated_text": "HI"}
    assert engines.calls == [("/v1/generate", "t1")]


@pytest.mark.parametrize(
    ("path", "body", "headers", "task_id"),
    [
        ("/v1/completions", {"model": "t1", "prompt": "hi"}, {}, "t1"),  # an OpenAI client sets no header
        ("/v1/completions", {"model": "tiny-llama:t2", "prompt": "hi"}, {}, "t2"),
        ("/v1/completions", {"model": "org/backbone", "prompt": "hi"}, {}, ""),  # the bare backbone: no task
        ("/v1/generate", {"inputs": "hi", "task_id": "t3"}, {}, "t3"),
        ("/v1/generate", {"inputs": "hi", "task_id": "t3"}, {MULTIPLEXED_HEADER: "t4"}, "t4"),  # the header wins
        ("/v1/generate", {"inputs": "hi", "task_ids": ["a", "b"]}, {}, ""),  # an ensemble
        ("/v1/generate", ["not", "an", "object"], {}, ""),
    ],
)
def test_the_task_for_the_router_comes_from_the_header_or_the_body(path, body, headers, task_id) -> None:
    engines = FakeEngines(None)
    run(lambda http: http.post(path, json=body, headers=headers), Relay(engines.forward))
    assert engines.calls == [(path, task_id)]


def test_a_body_that_is_not_json_names_no_task() -> None:
    engines = FakeEngines(None)
    run(lambda http: http.post("/v1/generate", content=b'{"task_id": "t1"', headers={"content-type": "text/plain"}),
        Relay(engines.forward))  # fmt: skip
    run(lambda http: http.post("/v1/generate", content=b'{"task_id": "t1"'), Relay(engines.forward))
    assert [task_id for _, task_id in engines.calls] == ["", ""]


def test_a_request_whose_replica_dies_before_answering_is_tried_on_another() -> None:
    engines = FakeEngines(0, None)
    response = run(lambda http: http.post("/v1/generate", json={"inputs": "hi"}), Relay(engines.forward))
    assert response.status_code == 200 and response.json() == {"generated_text": "HI"}
    assert len(engines.calls) == 2


def test_two_replicas_dying_answer_503_json_with_retry_after_in_the_routes_shape() -> None:
    native = run(lambda http: http.post("/v1/generate", json={"inputs": "hi"}), Relay(FakeEngines(0, 0).forward))
    assert native.status_code == 503 and native.headers["retry-after"] == "1"
    assert native.json()["error_type"] == "unavailable" and "2 tried" in native.json()["error"]
    openai = run(lambda http: http.get("/v1/models"), Relay(FakeEngines(0, 0).forward))
    assert openai.status_code == 503 and openai.headers["retry-after"] == "1"
    assert openai.json()["error"]["code"] == "replica_unavailable"
    assert openai.json()["error"]["type"] == "server_error"
    assert "x-should-retry" not in openai.headers  # the openai client retries a 503


def test_a_task_write_is_not_tried_twice() -> None:
    engines = FakeEngines(0, None)
    response = run(lambda http: http.put("/v1/tasks/t1", content=b"x"), Relay(engines.forward))
    assert response.status_code == 503 and len(engines.calls) == 1
    assert "1 tried" in response.json()["error"]


def test_a_stream_whose_replica_dies_mid_way_ends_with_the_apis_error_event() -> None:
    # messages: the status line, the first event, then the replica dies
    native = run(lambda http: http.post("/v1/generate_stream"), Relay(FakeEngines(2).forward))
    assert native.status_code == 200
    *events, last = [line.removeprefix("data: ") for line in native.text.splitlines() if line]
    assert events == ["a"] and json.loads(last)["error_type"] == "unavailable"
    openai = run(lambda http: http.post("/v1/completions", json={"stream": True}), Relay(FakeEngines(2).forward))
    lines = [line.removeprefix("data: ") for line in openai.text.splitlines() if line]
    assert lines[0] == "a" and json.loads(lines[1])["error"]["code"] == "replica_unavailable"
    assert lines[2:] == ["[DONE]"]


def test_the_openai_clients_retry_of_the_503_succeeds() -> None:
    openai = pytest.importorskip("openai")
    engines = FakeEngines(0, 0, None)  # the first request's two replicas die; the client's retry is answered

    async def complete() -> str:
        async with client(Relay(engines.forward)) as http:
            api = openai.AsyncOpenAI(base_url="http://ingress/v1", api_key="k", http_client=http, max_retries=2)
            completion = await api.completions.create(model="m", prompt="hi", max_tokens=2)
            return str(completion.choices[0].text)

    assert asyncio.run(complete()) == "HI"
    assert len(engines.calls) == 3


def test_health_answers_503_json_when_no_replica_takes_it() -> None:
    async def nobody(request: ForwardedRequest, task_id: str) -> AsyncIterator[list[Message]]:
        await asyncio.sleep(60)
        yield []

    response = run(lambda http: http.get("/health"), Relay(nobody, health_wait_s=0.2))
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error_type"] == "unavailable" and "found none" in response.json()["error"]
    assert run(lambda http: http.get("/health"), Relay(FakeEngines(None).forward)).json() == {"status": "ok"}


def test_health_generate_waits_for_its_token_however_long_it_takes() -> None:
    async def slow(request: ForwardedRequest, task_id: str) -> AsyncIterator[list[Message]]:
        await asyncio.sleep(0.5)  # a busy replica's one-token request
        yield [{"type": "http.response.start", "status": 200, "headers": []},
               {"type": "http.response.body", "body": b"generated"}]  # fmt: skip

    response = run(lambda http: http.get("/health/generate"), Relay(slow, health_wait_s=0.2))
    assert response.status_code == 200 and response.text == "generated"


def test_a_call_failing_otherwise_before_the_status_line_answers_the_servers_json_500() -> None:
    async def broken(request: ForwardedRequest, task_id: str) -> AsyncIterator[list[Message]]:
        raise RuntimeError("the handle call failed")
        yield []

    response = run(lambda http: http.post("/v1/generate", json={"inputs": "hi"}), Relay(broken))
    assert response.status_code == 500 and response.json()["error_type"] == "internal"


def test_the_app_sees_a_client_that_stays_until_its_answer_is_taken() -> None:
    app = FastAPI()

    @app.post("/echo")
    async def echo(body: dict[str, int]) -> dict[str, int]:
        return body

    request = ForwardedRequest({"type": "http", "method": "POST", "path": "/echo", "query_string": b"",
                                "headers": [(b"content-type", b"application/json")]}, b'{"a": 1}')  # fmt: skip

    async def collect() -> list[list[Message]]:
        return [batch async for batch in call_asgi(app, request)]

    ((start, body),) = asyncio.run(collect())  # a JSON answer: one item, its status line and body together
    assert start["status"] == 200 and json.loads(body["body"]) == {"a": 1}
