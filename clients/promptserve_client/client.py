"""`Client` and `AsyncClient`: the same methods; they only do the I/O, `_protocol` builds and reads."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse, connect_sse

from promptserve_client._protocol import (
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    Call,
    auth_headers,
    classify_call,
    generate_call,
    parse,
    parse_event,
    raise_for_error,
    register_call,
    score_call,
    task_path,
)
from promptserve_client.models import (
    ClassifyResponse,
    GenerateResponse,
    Health,
    Info,
    ScoreResponse,
    StreamEvent,
    TaskList,
    TaskRecord,
)

Timeout = float | httpx.Timeout


class Client:
    """A blocking client. `http_client` (optional) is any httpx.Client, e.g. one bound to an app in tests."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        *,
        http_client: httpx.Client | None = None,
    ) -> None:
        self._http = http_client or httpx.Client(base_url=base_url, timeout=timeout)
        self._owns_http = http_client is None
        self._headers = auth_headers(token)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def _send(self, call: Call) -> httpx.Response:
        return self._http.request(call.method, call.path, json=call.json, files=call.files, headers=self._headers)

    def health(self) -> Health:
        return parse(self._send(Call("GET", "/health")), Health)

    def info(self) -> Info:
        return parse(self._send(Call("GET", "/info")), Info)

    def register_task(self, task_id: str, adapter_dir: str | Path, labels: Sequence[str] | None = None) -> TaskRecord:
        """Upload a PEFT adapter directory; label names from `labels`, else from its config.json's id2label."""
        return parse(self._send(register_call(task_id, adapter_dir, labels)), TaskRecord)

    def list_tasks(self) -> list[TaskRecord]:
        return parse(self._send(Call("GET", "/v1/tasks")), TaskList).tasks

    def get_task(self, task_id: str) -> TaskRecord:
        return parse(self._send(Call("GET", task_path(task_id))), TaskRecord)

    def delete_task(self, task_id: str) -> None:
        raise_for_error(self._send(Call("DELETE", task_path(task_id))))

    def generate(
        self,
        inputs: str,
        task_id: str | None = None,
        task_ids: Sequence[str] | None = None,
        ensemble: str = "vote",
        **parameters: Any,
    ) -> GenerateResponse:
        call = generate_call(inputs, task_id, task_ids, ensemble, parameters, stream=False)
        return parse(self._send(call), GenerateResponse)

    def generate_stream(
        self,
        inputs: str,
        task_id: str | None = None,
        task_ids: Sequence[str] | None = None,
        ensemble: str = "vote",
        **parameters: Any,
    ) -> Iterator[StreamEvent]:
        """Yield events as tokens arrive; leaving the loop early closes the connection, which cancels the request."""
        call = generate_call(inputs, task_id, task_ids, ensemble, parameters, stream=True)
        with connect_sse(self._http, call.method, call.path, json=call.json, headers=self._headers) as source:
            if source.response.is_error:
                source.response.read()
                raise_for_error(source.response)
            for event in source.iter_sse():
                yield parse_event(event.data)

    def classify(
        self,
        inputs: str | Sequence[str],
        task_id: str | None = None,
        *,
        task_ids: Sequence[str] | None = None,
        ensemble: str | None = None,
        top_k: int | None = None,
    ) -> ClassifyResponse:
        """Labels by score for each input under a SEQ_CLS or TOKEN_CLS task (or an ensemble); top_k None: all."""
        call = classify_call(inputs, task_id, task_ids, ensemble, top_k)
        return parse(self._send(call), ClassifyResponse)

    def score(
        self,
        inputs: str,
        candidates: Sequence[str],
        task_id: str | None = None,
        *,
        task_ids: Sequence[str] | None = None,
    ) -> ScoreResponse:
        """Each candidate's log-probability after the input (rank classification), in the order given."""
        return parse(self._send(score_call(inputs, candidates, task_id, task_ids)), ScoreResponse)


class AsyncClient:
    """The asyncio twin of `Client`; `http_client` (optional) is any httpx.AsyncClient."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        *,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._http = http_client or httpx.AsyncClient(base_url=base_url, timeout=timeout)
        self._owns_http = http_client is None
        self._headers = auth_headers(token)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def _send(self, call: Call) -> httpx.Response:
        return await self._http.request(call.method, call.path, json=call.json, files=call.files, headers=self._headers)

    async def health(self) -> Health:
        return parse(await self._send(Call("GET", "/health")), Health)

    async def info(self) -> Info:
        return parse(await self._send(Call("GET", "/info")), Info)

    async def register_task(
        self, task_id: str, adapter_dir: str | Path, labels: Sequence[str] | None = None
    ) -> TaskRecord:
        """Upload a PEFT adapter directory; label names from `labels`, else from its config.json's id2label."""
        return parse(await self._send(register_call(task_id, adapter_dir, labels)), TaskRecord)

    async def list_tasks(self) -> list[TaskRecord]:
        return parse(await self._send(Call("GET", "/v1/tasks")), TaskList).tasks

    async def get_task(self, task_id: str) -> TaskRecord:
        return parse(await self._send(Call("GET", task_path(task_id))), TaskRecord)

    async def delete_task(self, task_id: str) -> None:
        raise_for_error(await self._send(Call("DELETE", task_path(task_id))))

    async def generate(
        self,
        inputs: str,
        task_id: str | None = None,
        task_ids: Sequence[str] | None = None,
        ensemble: str = "vote",
        **parameters: Any,
    ) -> GenerateResponse:
        call = generate_call(inputs, task_id, task_ids, ensemble, parameters, stream=False)
        return parse(await self._send(call), GenerateResponse)

    async def generate_stream(
        self,
        inputs: str,
        task_id: str | None = None,
        task_ids: Sequence[str] | None = None,
        ensemble: str = "vote",
        **parameters: Any,
    ) -> AsyncIterator[StreamEvent]:
        """Yield events as tokens arrive; closing the iterator early closes the connection, cancelling the request."""
        call = generate_call(inputs, task_id, task_ids, ensemble, parameters, stream=True)
        async with aconnect_sse(self._http, call.method, call.path, json=call.json, headers=self._headers) as source:
            if source.response.is_error:
                await source.response.aread()
                raise_for_error(source.response)
            async for event in source.aiter_sse():
                yield parse_event(event.data)

    async def classify(
        self,
        inputs: str | Sequence[str],
        task_id: str | None = None,
        *,
        task_ids: Sequence[str] | None = None,
        ensemble: str | None = None,
        top_k: int | None = None,
    ) -> ClassifyResponse:
        """Labels by score for each input under a SEQ_CLS or TOKEN_CLS task (or an ensemble); top_k None: all."""
        call = classify_call(inputs, task_id, task_ids, ensemble, top_k)
        return parse(await self._send(call), ClassifyResponse)

    async def score(
        self,
        inputs: str,
        candidates: Sequence[str],
        task_id: str | None = None,
        *,
        task_ids: Sequence[str] | None = None,
    ) -> ScoreResponse:
        """Each candidate's log-probability after the input (rank classification), in the order given."""
        return parse(await self._send(score_call(inputs, candidates, task_id, task_ids)), ScoreResponse)
