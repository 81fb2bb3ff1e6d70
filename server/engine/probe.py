"""A new task's probe: before a registration is stored, the engine runs the task once on two probe inputs.

A task whose values are finite but make the backbone's activations overflow would be accepted and could never
answer: its logits come out NaN or infinite, or the overflow swamps the input (the normalisations divide it away)
and the backbone answers the same thing, to the same log-probability, whatever it is asked. The probe finds either
while the upload can still be refused (422). Its rows are the engine's own: at the head of the queue and outside
the batch-size limit, beside whatever is running.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from prompt_store.errors import InvalidTask, TaskTooLarge
from prompt_store.types import TaskArtifact
from server.engine.backbone import Backbone
from server.engine.errors import EngineUnavailable, GenerationFailed, InputTooLong
from server.engine.intake import decoder_start, kv_prefix, single_row_request
from server.engine.request import Job, OutputSink, Request, Sequence
from server.engine.types import EngineOutput, SamplingParams

PROBE_TEXTS = ("promptserve probe", "A different input, 42!")
PROBE_NEW_TOKENS = 2
PROBE_TIMEOUT_S = 120.0
WAIT_SLICE_S = 0.25
# An id the task-id pattern refuses, so no user's task can share it; each probe has its own negative version,
# which KVMemory counts as superseded from the start: its keys and values go on the probe's last release.
PROBE_TASK_ID = "#probe"
probe_versions = itertools.count(1)


@dataclass
class Probe:
    artifact: TaskArtifact  # the task as the probe runs it: PROBE_TASK_ID, a fresh negative version
    requests: list[Request] = field(default_factory=list)
    outputs: dict[str, list[EngineOutput]] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def of(cls, artifact: TaskArtifact, backbone: Backbone, prompts_as_kv: bool) -> Probe:
        record = replace(artifact.record, task_id=PROBE_TASK_ID, version=-next(probe_versions))
        probe = cls(replace(artifact, record=record))
        for text in PROBE_TEXTS:
            input_ids = list(backbone.tokenizer(text)["input_ids"])
            check_positions(artifact, len(input_ids), backbone)
            request_id = f"{PROBE_TASK_ID}.{uuid.uuid4().hex[:12]}"
            probe.outputs[request_id] = []
            sink = partial_sink(probe, request_id)
            if artifact.record.is_classifier:
                request = classify_request(request_id, input_ids, probe.artifact, prompts_as_kv, sink, backbone)
            else:
                request = single_row_request(request_id, input_ids, probe.artifact, prompts_as_kv, PROBE_NEW_TOKENS,
                                             sink, decoder_start(backbone))  # fmt: skip
            request.jumps_queue = True
            probe.requests.append(request)
        return probe

    def on_output(self, request_id: str, output: EngineOutput) -> None:  # the engine thread
        self.outputs[request_id].append(output)
        if all(outputs and (outputs[-1].finished or outputs[-1].error) for outputs in self.outputs.values()):
            self.done.set()

    def wait(self, is_running: Callable[[], bool]) -> bool:
        """Until both rows answered (True), the timeout passed or the engine stopped (False)."""
        for _ in range(int(PROBE_TIMEOUT_S / WAIT_SLICE_S)):
            if self.done.wait(WAIT_SLICE_S):
                return True
            if not is_running():
                return False
        return False

    def verdict(self, artifact: TaskArtifact, finished: bool, backbone: Backbone) -> None:
        """Nothing if the task answered; InvalidTask if it cannot (TaskTooLarge if it does not fit)."""
        if not finished:
            raise EngineUnavailable(f"the engine did not run the new task's probe (within {PROBE_TIMEOUT_S:g} s)")
        errors = [output.error for outputs in self.outputs.values() for output in outputs if output.error]
        if any(isinstance(error, GenerationFailed) for error in errors):
            raise overflow(artifact, backbone, "NaN or infinity in its logits")
        if any(isinstance(error, InputTooLong) for error in errors):
            raise TaskTooLarge(f"expected a task whose virtual tokens fit the KV cache; found: {errors[0]}")
        if errors:
            raise errors[0]
        answers = [
            [(t.id, round(t.logprob, 6)) for o in outputs for t in o.tokens]
            + [[round(p, 6) for p in r.probs.flatten()[:64].tolist()] for o in outputs for r in o.results]
            for outputs in self.outputs.values()
        ]
        if answers[0] == answers[1]:
            raise overflow(artifact, backbone, "the same answer, to the same log-probability, for different inputs")


def classify_request(
    request_id: str, input_ids: list[int], task: TaskArtifact, prompts_as_kv: bool, sink: OutputSink, backbone: Backbone
) -> Request:
    """A classification task's probe row: its head's probabilities on the probe input."""
    encoder = backbone.encoder is not None
    request = Request(request_id, input_ids, SamplingParams(max_new_tokens=1), 0, sink, job=Job.CLASSIFY,
                      bidirectional=encoder, head_type=task.record.task_type)  # fmt: skip
    request.rows = [Sequence(request, task, 0, kv_prefix(task, prompts_as_kv and not encoder))]
    return request


def partial_sink(probe: Probe, request_id: str) -> Callable[[EngineOutput], None]:
    return lambda output: probe.on_output(request_id, output)


def check_positions(artifact: TaskArtifact, num_input: int, backbone: Backbone) -> None:
    """A task with more virtual tokens than the backbone has positions could never run a row."""
    num_virtual = artifact.record.num_virtual_tokens
    room = (
        backbone.max_positions - (backbone.encoder.position_offset if backbone.encoder else 0)
        if backbone.max_positions
        else None
    )
    if room is not None and num_virtual + num_input + PROBE_NEW_TOKENS > room:
        raise InvalidTask(
            f"expected a task whose {num_virtual} virtual tokens leave room for an input in the backbone's "
            f"{room} positions; found no room"
        )


def overflow(artifact: TaskArtifact, backbone: Backbone, found: str) -> InvalidTask:
    dtype = str(backbone.dtype).removeprefix("torch.")
    return InvalidTask(
        f"expected a task the backbone can answer under; found {found} when task {artifact.record.task_id!r} ran on "
        f"probe inputs: its values overflow the backbone's {dtype} activations, so it could never answer"
    )
