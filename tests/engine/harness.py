"""Drives the synchronous engine core step by step, with a real store and KV pool, for exact tests."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from prompt_store.registry import TaskStore
from server.engine import cpu_linears
from server.engine.backbone import Backbone, load_backbone, shared_linear_layers
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.intake import IntakeConfig, build_request
from server.engine.output import OutputProcessor
from server.engine.request import Request
from server.engine.types import Completion, EngineOutput, EnsembleMode, GenerateInput, RequestOutput, SamplingParams
from tests.fixtures import TinyBackbone


class Harness:
    def __init__(
        self,
        tiny: TinyBackbone,
        store_dir: Path,
        device: str = "cpu",
        dtype: str = "float32",
        kv_cache_tokens: int = 1 << 15,
        **config: Any,
    ) -> None:
        """`config`: EngineConfig fields (max_batch_size, max_batch_tokens, kv_block_size, cache_prompt_kv, ...)."""
        self.tiny = tiny
        self.backbone: Backbone = load_backbone(str(tiny.path), device, dtype)
        fp = self.backbone.fingerprint
        token_bytes = 2 * self.backbone.kind.num_pool_layers(fp) * fp.kv_dim * self.backbone.dtype.itemsize
        defaults = {"max_batch_tokens": 4096, "max_waiting": 64, "kv_cache_bytes": kv_cache_tokens * token_bytes}
        self.config = EngineConfig(device=device, dtype=dtype, **{**defaults, **config})
        self.store = TaskStore(store_dir, fp, max_cached_adapters=self.config.num_cpu_loras)
        for kind, adapter_dir in tiny.adapters.items():
            self.store.register_dir(kind, adapter_dir)
        self.engine = Engine(self.backbone, self.config)
        self.intake = IntakeConfig(max_input_tokens=256, max_new_tokens=256, prompts_as_kv=self.config.cache_prompt_kv)
        self.outputs: dict[str, list[RequestOutput]] = defaultdict(list)
        self.processors: dict[str, OutputProcessor] = {}
        self.commands: list[Callable[[], None]] = []

    @staticmethod
    def tokenizer_of(tiny: TinyBackbone) -> Any:
        """The backbone's own tokenizer, as the engine loads it."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tiny.path)

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
        request = build_request(generate, self.backbone, self.store, self.intake, self.sink)
        self.processors[request.request_id] = OutputProcessor(request, self.backbone.tokenizer)
        return request

    def sink(self, event: EngineOutput) -> None:
        """What AsyncEngine.generate does, synchronously: text is made here; engine commands wait for the step's
        end (in the server they cross the inbox, a step or so later too)."""
        processor = self.processors[event.request_id]
        was_finished = processor.is_finished
        processed = processor.process(event)
        self.outputs[event.request_id] += processed.outputs
        engine_done = event.finished or event.error is not None
        if processed.is_finished and not was_finished and not engine_done:
            self.commands.append(partial(self.engine.abort, event.request_id))
        elif processed.stopped_rows and not processed.is_finished:
            self.commands.append(partial(self.engine.stop_rows, event.request_id, processed.stopped_rows))

    def step(self) -> None:
        self.engine.step()
        commands, self.commands = self.commands, []
        for command in commands:
            command()

    def run(self, *requests: Request, later: dict[int, list[Request]] | None = None) -> list[Completion]:
        """Add `requests`, then step until idle; `later[k]` joins after step k (mid-flight)."""
        for request in requests:
            self.engine.add(request)
        step = 0
        while self.engine.has_work() or (later and any(k >= step for k in later)):
            for request in (later or {}).get(step, []):
                self.engine.add(request)
            if self.engine.has_work():
                self.step()
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
        return self.engine.is_idle() and self.engine.memory.num_task_refs() == 0

    def through_onednn(self) -> int:
        return through_onednn(self.backbone)


def through_onednn(backbone: Backbone) -> int:
    """Every shared-pass linear layer through oneDNN, every call however small (the tiny test models never reach
    `auto`'s threshold); how many layers."""
    return cpu_linears.install(shared_linear_layers(backbone), backbone.device, "onednn", min_macs=0)


def token_ids(completion: Completion) -> list[int]:
    return [token.id for token in completion.tokens]
