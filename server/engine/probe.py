"""A new task's probe: before a registration is stored, the engine runs the task once on a probe input.

A task whose values are finite but make the backbone's activations overflow would be accepted and could never
answer: its logits come out NaN or infinite, or all equal (the normalisations divide the overflow away and nothing
of the input is left: every answer is token 0). The probe finds it while the upload can still be refused (422). It
runs as one row of the engine's own, at the head of the queue, beside whatever else is running.
"""

from __future__ import annotations

import itertools
import math
import threading
import uuid
from dataclasses import dataclass, field, replace

from prompt_store.errors import InvalidTask
from prompt_store.types import TaskArtifact
from server.engine.backbone import Backbone
from server.engine.errors import EngineUnavailable, GenerationFailed
from server.engine.intake import single_row_request
from server.engine.request import Request
from server.engine.types import EngineOutput

PROBE_TEXT = "promptserve probe"
PROBE_NEW_TOKENS = 2
PROBE_TIMEOUT_S = 120.0
PROBE_TASK_ID = "promptserve.probe"  # with a version of its own per probe (negative: stored ones start at 1)
probe_versions = itertools.count(1)


@dataclass
class Probe:
    task_id: str
    version: int  # never a stored version, never reused: its cache entry cannot be confused with another task's
    request: Request = field(init=False)
    outputs: list[EngineOutput] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def of(cls, artifact: TaskArtifact, backbone: Backbone, prompts_as_kv: bool) -> Probe:
        probe = cls(PROBE_TASK_ID, -next(probe_versions))
        task = replace(artifact, record=replace(artifact.record, task_id=probe.task_id, version=probe.version))
        input_ids = list(backbone.tokenizer(PROBE_TEXT)["input_ids"])
        request_id = f"{PROBE_TASK_ID}{probe.version}.{uuid.uuid4().hex[:8]}"
        probe.request = single_row_request(request_id, input_ids, task, prompts_as_kv, PROBE_NEW_TOKENS, probe.sink)
        return probe

    def sink(self, output: EngineOutput) -> None:  # the engine thread
        self.outputs.append(output)
        if output.finished or output.error is not None:
            self.done.set()

    def verdict(self, artifact: TaskArtifact, finished: bool, backbone: Backbone) -> None:
        """Nothing if the task answered; InvalidTask if its logits were not finite, or all equal."""
        if not finished:
            raise EngineUnavailable(f"the engine did not run the new task's probe within {PROBE_TIMEOUT_S:g} s")
        error = next((output.error for output in self.outputs if output.error is not None), None)
        if isinstance(error, GenerationFailed):
            raise overflow(artifact, backbone, "NaN or infinity")
        if error is not None:
            raise error
        # the chosen (greedy) token's log-probability is -log(vocab) only when every logit is the same
        uniform = -math.log(backbone.fingerprint.vocab_size) + 1e-4
        if all(token.logprob <= uniform for output in self.outputs for token in output.tokens):
            raise overflow(artifact, backbone, "every logit equal (nothing of the input left)")


def overflow(artifact: TaskArtifact, backbone: Backbone, found: str) -> InvalidTask:
    dtype = str(backbone.dtype).removeprefix("torch.")
    return InvalidTask(
        f"expected a task the backbone can answer under; found {found} when task {artifact.record.task_id!r} ran "
        f"on a probe input: its values overflow the backbone's {dtype} activations, so it could never answer"
    )
