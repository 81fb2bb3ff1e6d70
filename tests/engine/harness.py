"""Drives the synchronous engine core step by step, with a real store and prompt cache, for exact tests."""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from pathlib import Path

from prompt_store.cache import PromptCache
from prompt_store.registry import TaskStore
from server.engine.backbone import Backbone, load_backbone
from server.engine.engine import Engine
from server.engine.intake import IntakeLimits, build_request
from server.engine.model_runner import virtual_token_kv
from server.engine.request import Request
from server.engine.scheduler import SchedulerConfig
from server.engine.types import Completion, EnsembleMode, GenerateInput, RequestOutput, SamplingParams
from tests.fixtures import TinyBackbone

LIMITS = IntakeLimits(max_input_tokens=256, max_new_tokens=256)


class Harness:
    def __init__(
        self,
        tiny: TinyBackbone,
        store_dir: Path,
        max_batch_size: int = 32,
        max_waiting: int = 64,
        device: str = "cpu",
        dtype: str = "float32",
        prefill_split_tokens: int = 256,
        cache_prompt_kv: bool = True,
    ) -> None:
        self.tiny = tiny
        self.backbone: Backbone = load_backbone(str(tiny.path), device, dtype)
        self.store = TaskStore(store_dir, self.backbone.fingerprint)
        for kind, adapter_dir in tiny.adapters.items():
            self.store.register_dir(kind, adapter_dir)
        fp = self.backbone.fingerprint
        prepare = partial(virtual_token_kv, self.backbone) if cache_prompt_kv else None
        self.cache = PromptCache(fp, self.backbone.device, self.backbone.dtype, budget_bytes=1 << 20, prepare=prepare)
        self.engine = Engine(
            self.backbone, self.cache, SchedulerConfig(max_batch_size, 100_000, max_waiting, prefill_split_tokens)
        )
        self.outputs: dict[str, list[RequestOutput]] = defaultdict(list)

    def request(
        self,
        text: str,
        *task_ids: str | None,
        ensemble: EnsembleMode | None = None,
        request_id: str | None = None,
        **sampling: object,
    ) -> Request:
        params = SamplingParams(**{"max_new_tokens": 8, **sampling})  # type: ignore[arg-type]
        generate = GenerateInput(text, tuple(task_ids) or (None,), ensemble, params, request_id)
        return build_request(generate, self.backbone, self.store, LIMITS, self.sink)

    def sink(self, output: RequestOutput) -> None:
        self.outputs[output.request_id].append(output)

    def run(self, *requests: Request, later: dict[int, list[Request]] | None = None) -> list[Completion]:
        """Add `requests`, then step until idle; `later[k]` joins after step k (mid-flight)."""
        for request in requests:
            self.engine.add(request)
        step = 0
        while self.engine.has_work() or (later and any(k >= step for k in later)):
            for request in (later or {}).get(step, []):
                self.engine.add(request)
            if self.engine.has_work():
                self.engine.step()
            step += 1
        everything = [*requests, *(r for group in (later or {}).values() for r in group)]
        return [self.completion(request.request_id) for request in everything]

    def completion(self, request_id: str) -> Completion:
        last = self.outputs[request_id][-1]
        assert last.error is None, f"request {request_id} failed: {last.error!r}"
        assert last.completion is not None
        return last.completion

    def alone(self, text: str, task_id: str | None, **sampling: object) -> Completion:
        return self.run(self.request(text, task_id, **sampling))[0]

    def is_idle(self) -> bool:
        return self.cache.num_refs() == 0 and self.engine.batch is None and not self.engine.has_work()


def token_ids(completion: Completion) -> list[int]:
    return [token.id for token in completion.tokens]
