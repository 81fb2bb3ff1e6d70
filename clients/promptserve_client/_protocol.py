"""What the sync and async clients share: building each call and reading each answer. No I/O happens here."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from promptserve_client.errors import PromptserveError, ValidationError, make_error
from promptserve_client.models import StreamEvent

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)  # a long generation is one slow response
CONFIG_FILE, MODEL_FILE = "adapter_config.json", "adapter_model.safetensors"
MODEL_CONFIG_FILE, LABELS_FILE = "config.json", "labels.json"  # transformers' config (id2label); the labels part
PARAMETER_NAMES = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed", "stop", "details")
ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    json: dict[str, Any] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def task_path(task_id: str) -> str:
    """The task's URL path, every character of the id escaped; the server judges the id itself.

    `quote` leaves dots alone, and a URL drops the dot segments `.` and `..` (`/v1/tasks/.` is `/v1/tasks`):
    they are escaped too, so that the server sees, and refuses, the id that was given.
    """
    if not task_id:
        raise ValidationError("expected a task id of at least one character; found ''")
    escaped = quote(task_id, safe="")
    return f"/v1/tasks/{escaped.replace('.', '%2E') if task_id in ('.', '..') else escaped}"


def register_call(task_id: str, adapter_dir: str | Path, labels: Sequence[str] | None = None) -> Call:
    """The upload; label names from `labels`, else from the directory's config.json (id2label), else none."""
    adapter_dir = Path(adapter_dir)
    config, model = read_adapter(adapter_dir)
    files = {
        "adapter_config": (CONFIG_FILE, config, "application/json"),
        "adapter_model": (MODEL_FILE, model, "application/octet-stream"),
    }
    names = names_of(labels, "labels") if labels is not None else read_label_names(adapter_dir)
    if names is not None:
        files["labels"] = (LABELS_FILE, json.dumps(names).encode(), "application/json")
    return Call("PUT", task_path(task_id), files=files)


def read_adapter(adapter_dir: Path) -> tuple[bytes, bytes]:
    """The two files of a PEFT prompt-learning adapter saved with `save_pretrained`."""
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"expected a PEFT adapter directory; found no directory at {adapter_dir}")
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (adapter_dir / name).is_file():
            hint = " (pickle is never read: save with safe_serialization=True)" if name == MODEL_FILE else ""
            found = sorted(p.name for p in adapter_dir.iterdir())
            raise FileNotFoundError(f"expected {adapter_dir / name}{hint}; found {found}")
    return (adapter_dir / CONFIG_FILE).read_bytes(), (adapter_dir / MODEL_FILE).read_bytes()


def read_label_names(adapter_dir: Path) -> list[str] | None:
    """Label names next to an adapter: a `labels.json` array (a version copied out of a server's store), else the
    `id2label` of a config.json that `model.config.save_pretrained(adapter_dir)` wrote, by id; None if neither."""
    if (adapter_dir / LABELS_FILE).is_file():
        return read_labels_json(adapter_dir / LABELS_FILE)
    path = adapter_dir / MODEL_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_bytes())
    except ValueError as exc:
        raise ValueError(
            f"{path}: expected a JSON object (a transformers config); found invalid JSON ({exc})"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object (a transformers config); found {type(config).__name__}")
    id2label = config.get("id2label")
    return None if id2label is None else labels_of_id2label(id2label, path)


def read_labels_json(path: Path) -> list[str]:
    expected = "expected a JSON array of label names"
    try:
        names = json.loads(path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path}: {expected}; found invalid JSON ({exc})") from None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{path}: {expected}; found {str(names)[:200]}")
    return names


def labels_of_id2label(id2label: Any, path: Path) -> list[str]:
    """Keys "0".."N-1", each once, to names: the list of names, class i at index i."""
    if not isinstance(id2label, dict) or not id2label:
        raise ValueError(f'{path}: id2label: expected an object of ids "0".."N-1" to label names; found {id2label!r}')
    expected = [str(i) for i in range(len(id2label))]
    if set(id2label) != set(expected):
        found = sorted(id2label, key=lambda key: (len(key), key))
        raise ValueError(f"{path}: id2label: expected the ids {expected} (0..N-1, each once); found {found}")
    not_names = {key: value for key, value in id2label.items() if not isinstance(value, str)}
    if not_names:
        raise ValueError(f"{path}: id2label: expected a string label name for every id; found {not_names}")
    return [id2label[key] for key in expected]


def generate_call(
    inputs: str,
    task_id: str | None,
    task_ids: Sequence[str] | None,
    ensemble: str,
    parameters: Mapping[str, Any],
    stream: bool,
) -> Call:
    unknown = sorted(set(parameters) - set(PARAMETER_NAMES))
    if unknown:
        raise TypeError(f"unknown generation parameters {unknown}; expected some of {list(PARAMETER_NAMES)}")
    body: dict[str, Any] = {"inputs": inputs, "parameters": dict(parameters)}
    if task_ids is not None:
        body.update(task_ids=list(task_ids), ensemble=ensemble)
    else:
        body["task_id"] = task_id
    return Call("POST", "/v1/generate_stream" if stream else "/v1/generate", json=body)


def classify_call(
    inputs: str | Sequence[str],
    task_id: str | None,
    task_ids: Sequence[str] | None,
    ensemble: str | None,
    top_k: int | None,
) -> Call:
    body: dict[str, Any] = {"inputs": inputs if isinstance(inputs, str) else names_of(inputs, "inputs")}
    body.update(target_of(task_id, task_ids), parameters={"top_k": top_k})
    if ensemble is not None:
        body["ensemble"] = ensemble
    return Call("POST", "/v1/classify", json=body)


def score_call(inputs: str, candidates: Sequence[str], task_id: str | None, task_ids: Sequence[str] | None) -> Call:
    body = {"inputs": inputs, "candidates": names_of(candidates, "candidates"), **target_of(task_id, task_ids)}
    return Call("POST", "/v1/score", json=body)


def target_of(task_id: str | None, task_ids: Sequence[str] | None) -> dict[str, Any]:
    """The task fields that were given; the server judges them (both given, an empty list)."""
    target: dict[str, Any] = {"task_id": task_id}
    if task_ids is not None:
        target["task_ids"] = names_of(task_ids, "task_ids")
    return target


def names_of(values: Sequence[str], what: str) -> list[str]:
    """A list of strings; one string alone is refused, since iterating it would send its characters."""
    if isinstance(values, str):
        raise TypeError(f"{what}: expected a list of strings; found the string {values!r}")
    found = [value for value in values if not isinstance(value, str)]
    if found:
        raise TypeError(f"{what}: expected a list of strings; found also {found!r}")
    return list(values)


# ---- answers


def raise_for_error(response: httpx.Response) -> httpx.Response:
    """Raise the typed error of a non-2xx response (read it first); return the response otherwise."""
    if response.is_success:
        return response
    raise error_of(response)


def error_of(response: httpx.Response) -> PromptserveError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    message = str(body.get("error") or response.text or response.reason_phrase)
    return make_error(body.get("error_type"), message, response.status_code, retry_after_of(response))


def retry_after_of(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def parse(response: httpx.Response, model: type[ModelT]) -> ModelT:
    return model.model_validate_json(raise_for_error(response).content)


def parse_event(data: str) -> StreamEvent:
    """One event's data; an in-band error (the stream had already started) raises its typed error."""
    payload = json.loads(data)
    if "error" in payload:
        raise make_error(payload.get("error_type"), str(payload["error"]))
    return StreamEvent.model_validate(payload)
