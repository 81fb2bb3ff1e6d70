"""A stand-in server for what the app under test does not serve yet (classify, score, a labels part): it records
each request and answers what the test told it to."""

from __future__ import annotations

import email
import json
from dataclasses import dataclass, field
from email.message import Message
from typing import Any

import httpx

TASK_RECORD = {
    "task_id": "sentiment",
    "version": 1,
    "method": "prompt_tuning",
    "num_virtual_tokens": 8,
    "bytes": 100,
    "sha256": "0" * 64,
    "created_at": "2025-01-01T00:00:00Z",
}


@dataclass(frozen=True)
class Part:
    filename: str | None
    content_type: str
    content: bytes


@dataclass
class CannedServer:
    status: int = 200
    body: Any = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)

    def answer(self, body: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.body, self.status, self.headers = body, status, headers or {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return httpx.Response(self.status, json=self.body, headers=self.headers)

    @property
    def last_body(self) -> Any:
        return json.loads(self.requests[-1].content)

    @property
    def last_parts(self) -> dict[str, Part]:
        return multipart_parts(self.requests[-1])


def multipart_parts(request: httpx.Request) -> dict[str, Part]:
    """The parts of a multipart/form-data request by name, read with the standard library's MIME parser."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    parts: list[Message] = email.message_from_bytes(head + request.content).get_payload()  # type: ignore[assignment]
    return {str(part.get_param("name", header="content-disposition")): part_of(part) for part in parts}


def part_of(part: Message) -> Part:
    content = part.get_payload(decode=True)
    assert isinstance(content, bytes)
    return Part(part.get_filename(), part.get_content_type(), content)
