"""Schemathesis, every check, against the real server on a tiny backbone through a real port: the OpenAPI
document tells the truth (statuses, error bodies, the stream's events, what a valid request is) and nothing
answers 5xx.

Every phase runs: examples (valid adapters given as examples, so registration is exercised with good input, not
only bad), coverage, fuzzing and stateful. The rules JSON Schema can say are in the document (the backbone's own
ones once its engine is up: token ids within its vocabulary, an ensemble named on the backbone's model, a task
for /v1/classify on a backbone without a head of its own, max_tokens 0 only with echo). Some expectations are
widened, each for a reason a schema cannot carry: a generation or scoring request may be 413 (too many tokens: a
token count is not a string length); an upload may be 422 (an adapter's shapes must fit the backbone, which no
JSON Schema of a file part can say); a classification may be 400 (its tasks here are generation tasks: what kind
a task is, no schema can say); a completion, a chat completion or a /tokenize may be 400 (the backbone's chat
template refuses messages it cannot render; min_tokens above max_tokens; a task of another kind).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events

from server.api.settings import Settings
from tests.fixtures import TinyBackbone, with_chat_template
from tests.live_server import live_server

MAX_EXAMPLES = 10
CONFIG = """
base-url = "{url}"
seed = 1
[checks]
enabled = true
[generation]
max-examples = {max_examples}
database = "none"
[[operations]]
include-path-regex = "^/v1/generate"
checks.positive_data_acceptance.expected-statuses = ["2xx", "404", "413", "429", "503"]
[[operations]]
include-path-regex = "^/v1/score$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "404", "413", "429", "503"]
[[operations]]
include-path-regex = "^/v1/classify$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404", "413", "429", "503"]
[[operations]]
include-path-regex = "^/v1/(chat/)?completions$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404", "429", "503"]
[[operations]]
include-path-regex = "^/(de)?tokenize$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "404", "503"]
[[operations]]
include-path-regex = "^/v1/models/"
checks.positive_data_acceptance.expected-statuses = ["2xx", "404", "503"]
[[operations]]
include-name = "PUT /v1/tasks/{{task_id}}"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "422", "503"]
"""


NATIVE_EXAMPLES = {
    "/v1/score": {"task": {"inputs": "hi", "candidates": ["yes", "no"], "task_id": "prefix"}},
}
OPENAI_EXAMPLES = {
    "/v1/completions": {
        "task": {"model": "prefix", "prompt": ["hi", "there"], "max_tokens": 4, "n": 2, "logprobs": 2},
        "stream": {"model": "prompt_tuning", "prompt": "hi", "stream": True, "stream_options": {"include_usage": True}},
    },
    "/v1/chat/completions": {
        "task": {
            "model": "prefix",
            "messages": [{"role": "user", "content": "hi"}],
            "logprobs": True,
            "top_logprobs": 2,
        },
        "stream": {"model": "p_tuning_mlp", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    },
}


@dataclass
class FuzzRun:
    num_requests: int = 0
    failures: list[str] = field(default_factory=list)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    checks: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def server_url(tiny_llama: TinyBackbone, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    backbone = with_chat_template(tiny_llama.path, tmp_path_factory.mktemp("fuzz-chat") / "llama")
    settings = Settings(
        model=str(backbone),
        store_dir=str(tmp_path_factory.mktemp("fuzz-store")),
        demo_tasks=False,
        max_new_tokens_limit=8,
        max_input_tokens=64,
        max_batch_size=4,
        max_waiting=16,  # the most choices a completion may ask for: a few more than the batch's rows
        poll_interval_s=0,
        log_level="critical",
    )
    with live_server(settings) as url:
        for kind, adapter_dir in tiny_llama.adapters.items():
            httpx.put(f"{url}/v1/tasks/{kind}", files=adapter_files(adapter_dir), timeout=30).raise_for_status()
        yield url


def adapter_files(adapter_dir: Path) -> dict[str, bytes]:
    return {
        "adapter_config": (adapter_dir / "adapter_config.json").read_bytes(),
        "adapter_model": (adapter_dir / "adapter_model.safetensors").read_bytes(),
    }


def with_valid_upload_examples(document: dict[str, Any], tiny: TinyBackbone) -> dict[str, Any]:
    """Examples a random string cannot stumble on: valid adapters, and OpenAI requests naming a registered task."""
    multipart = document["paths"]["/v1/tasks/{task_id}"]["put"]["requestBody"]["content"]["multipart/form-data"]
    multipart["examples"] = {kind: {"value": adapter_files(tiny.adapters[kind])} for kind in ("prefix", "p_tuning_mlp")}
    for path, body in (OPENAI_EXAMPLES | NATIVE_EXAMPLES).items():
        content = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        content["examples"] = {name: {"value": value} for name, value in body.items()}
    return document


def fuzz(url: str, document: dict[str, Any]) -> FuzzRun:
    config = SchemathesisConfig.from_str(CONFIG.format(url=url, max_examples=MAX_EXAMPLES))
    run = FuzzRun()
    for event in schemathesis.engine.from_schema(schemathesis.openapi.from_dict(document, config=config)).execute():
        if isinstance(event, events.FatalError | events.NonFatalError):
            run.failures.append(f"{type(event).__name__}: {event}")
        if not isinstance(event, events.ScenarioFinished):
            continue
        recorder = event.recorder
        run.num_requests += len(recorder.interactions)
        for interaction in recorder.interactions.values():
            if interaction.response is not None:
                path = re.sub(r"/v1/tasks/[^?]+", "/v1/tasks/{id}", interaction.request.uri.split(url, 1)[-1])
                run.statuses[(f"{interaction.request.method} {path}", interaction.response.status_code)] += 1
        for checks in recorder.checks.values():
            for check in checks:
                run.checks.add(check.name)
                if check.status.name == "FAILURE" and check.failure_info is not None:
                    failure, sample = str(check.failure_info.failure)[:500], check.failure_info.code_sample[:900]
                    run.failures.append(f"{recorder.label} {check.name}: {failure}\n{sample}")
    return run


def test_schemathesis_with_every_check_finds_nothing(server_url: str, tiny_llama: TinyBackbone):
    logging.getLogger("schemathesis").setLevel(logging.ERROR)
    document = with_valid_upload_examples(httpx.get(f"{server_url}/openapi.json").json(), tiny_llama)
    run = fuzz(server_url, document)
    print(f"schemathesis sent {run.num_requests} requests; checks: {', '.join(sorted(run.checks))}")
    assert not run.failures, "\n".join(run.failures[:10])
    assert run.num_requests > 300
    assert {"positive_data_acceptance", "negative_data_rejection", "response_schema_conformance"} <= run.checks
    registered = sum(
        n for (operation, status), n in run.statuses.items() if operation.startswith("PUT") and status < 300
    )
    assert registered > 0, "the examples phase should register valid adapters"
    for operation in ("POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models"):
        assert sum(n for (op, status), n in run.statuses.items() if op == operation and status < 300), operation
    assert not [key for key in run.statuses if key[1] >= 500]
