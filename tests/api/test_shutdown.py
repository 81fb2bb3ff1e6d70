"""SIGTERM with requests in flight: the server stops taking connections, lets running requests finish for
`shutdown_grace_s`, then answers the rest with 503, and exits: no client holds it open."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from server.api.app import create_app
from server.api.settings import Settings
from server.engine.async_engine import build_engine
from server.engine.config import EngineConfig
from tests.fixtures import TinyBackbone
from tests.live_server import serving

GRACE_S = 1.5
STEP_S = 0.02  # each engine step made this slow, so that the long request outlasts the grace


def test_sigterm_drains_running_requests_within_the_grace_then_answers_the_rest_503(
    tiny_llama: TinyBackbone, tmp_path: Path
):
    config = EngineConfig(model=str(tiny_llama.path), store_dir=str(tmp_path / "s"), poll_interval_s=0,
                          self_check=False)  # fmt: skip
    engine = build_engine(config)
    engine.add_step_listener(lambda stats: time.sleep(STEP_S))
    object.__setattr__(engine.backbone, "eos_token_ids", frozenset())  # every request runs to its length
    settings = Settings(demo_tasks=False, shutdown_grace_s=GRACE_S)
    answers: dict[str, httpx.Response] = {}

    def ask(name: str, url: str, max_new_tokens: int) -> None:
        body = {"inputs": name, "parameters": {"max_new_tokens": max_new_tokens}}
        answers[name] = httpx.post(f"{url}/v1/generate", json=body, timeout=30)

    with serving(create_app(settings, engine), settings) as (url, server):
        clients = [threading.Thread(target=ask, args=("short", url, 10)),  # ~0.2 s: inside the grace
                   threading.Thread(target=ask, args=("long", url, 400))]  # ~8 s: past it  # fmt: skip
        for client in clients:
            client.start()
        while engine.stats().num_running < 2:
            time.sleep(0.01)
        started = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        for client in clients:
            client.join(timeout=10)
        stopped = time.monotonic() - started
    assert answers["short"].status_code == 200 and answers["short"].json()["generated_text"] is not None
    assert answers["long"].status_code == 503 and answers["long"].json()["error_type"] == "unavailable"
    assert "shutting down" in answers["long"].json()["error"]
    assert GRACE_S <= stopped < GRACE_S + 2
    assert not engine.thread.is_alive()
