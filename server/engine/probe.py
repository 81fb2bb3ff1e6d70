"""A new task's probe: before a registration is stored, the engine runs the task on two probe inputs (and a copy of it
with its vectors zeroed on the first).

A task whose values are finite but make the backbone's activations overflow would be accepted and could never
answer: its logits or hidden states come out NaN or infinite, or the overflow swamps the input (the normalisations
divide it away) and the backbone computes the same thing whatever it is asked. The probe finds either while the
upload can still be refused (422). It judges the computation, not the answer: the two inputs' first logit vectors
(a classification task: the last hidden state its head reads) must differ by more than the backbone dtype's
rounding, and differ from the zeroed copy's (vectors whose root-mean-square overflows normalise to zero). A task
that is merely confident, answers the same text to everything, or classifies sharply still computes from its input,
and is kept. Its rows are the engine's own: at the head of the queue and outside the
batch-size limit, beside whatever is running.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from prompt_store.errors import InvalidTask, TaskTooLarge
from prompt_store.types import TaskArtifact
from server.engine.backbone import Backbone
from server.engine.errors import EngineUnavailable, InputTooLong, NonFiniteOutput, UnservableTarget
from server.engine.intake import single_row_request
from server.engine.request import Job, OutputSink, Request, Sequence
from server.engine.types import EngineOutput, SamplingParams

PROBE_TEXTS = ("promptserve probe", "A different input, 42!")
ROUNDING_UNITS = 16  # vectors closer than this many units in the last place compute nothing from their input
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
        """Three rows: the task on each probe input, and a copy of the task with its vectors zeroed on the first."""
        probe = cls(as_probe(artifact, artifact.prompt_embeddings))
        rows = [(PROBE_TEXTS[0], probe.artifact), (PROBE_TEXTS[1], probe.artifact)]
        if artifact.record.method.is_prompt_learning:  # LoRA's B starts at zero: an untrained one is the backbone
            rows.append((PROBE_TEXTS[0], as_probe(artifact, torch.zeros_like(artifact.prompt_embeddings))))
        for text, task in rows:
            input_ids = list(backbone.tokenizer(text)["input_ids"])
            check_positions(artifact, len(input_ids), backbone)
            probe.requests.append(probe.request(input_ids, task, backbone, prompts_as_kv))
        return probe

    def request(self, input_ids: list[int], task: TaskArtifact, backbone: Backbone, prompts_as_kv: bool) -> Request:
        request_id = f"{PROBE_TASK_ID}.{uuid.uuid4().hex[:12]}"
        self.outputs[request_id] = []
        sink = partial_sink(self, request_id)
        if task.record.is_classifier:
            request = classify_request(request_id, input_ids, task, prompts_as_kv, sink, backbone)
        else:
            request = single_row_request(request_id, input_ids, task, prompts_as_kv, PROBE_NEW_TOKENS, sink,
                                         backbone.kind)  # fmt: skip
        request.jumps_queue = True
        request.keeps_probe_vectors = True
        return request

    def on_output(self, request_id: str, output: EngineOutput) -> None:  # the engine thread
        self.outputs[request_id].append(output)
        if all(outputs and (outputs[-1].finished or outputs[-1].error) for outputs in self.outputs.values()):
            self.done.set()

    def wait(self, is_running: Callable[[], bool]) -> bool:
        """Until every row answered (True), the timeout passed or the engine stopped (False)."""
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
        if any(isinstance(error, NonFiniteOutput) for error in errors):
            raise overflow(artifact, backbone, "NaN or infinity in its logits")
        if unservable := [error for error in errors if isinstance(error, UnservableTarget)]:
            raise InvalidTask(unservable[0].naming(f"task {artifact.record.task_id!r}"))  # not '#probe' version -N
        if any(isinstance(error, InputTooLong) for error in errors):
            raise TaskTooLarge(f"expected a task whose virtual tokens fit the KV cache; found: {errors[0]}")
        if errors:
            raise errors[0]
        judge(artifact, backbone, [request.rows[0].probe_vector for request in self.requests])


def as_probe(artifact: TaskArtifact, prompt_embeddings: torch.Tensor) -> TaskArtifact:
    """The task as a probe runs it: PROBE_TASK_ID, a fresh negative version, these vectors."""
    record = replace(artifact.record, task_id=PROBE_TASK_ID, version=-next(probe_versions))
    return replace(artifact, record=record, prompt_embeddings=prompt_embeddings)


def judge(artifact: TaskArtifact, backbone: Backbone, vectors: list[torch.Tensor | None]) -> None:
    """The task computes from its input and from its own values: finite vectors whose two inputs differ by more than
    rounding in the backbone's dtype, and that differ from a task of zeros' on the same input (a task whose values
    the normalisations divide to nothing, as an overflowing root-mean-square does, answers as zeros would)."""
    what = "hidden states" if artifact.record.is_classifier else "logits"
    first, second, *zeros = vectors
    erased = zeros[0] if zeros else None  # a prompt-learning task's copy with its vectors zeroed
    assert first is not None and second is not None, "a probe row that answered has its vector"
    if not bool(first.isfinite().all() and second.isfinite().all()):
        raise overflow(artifact, backbone, f"NaN or infinity in its final {what}")
    if is_same(first, second, backbone.dtype):
        raise overflow(artifact, backbone, f"the same final {what} for different inputs ({difference(first, second)})")
    if erased is not None and is_same(first, erased, backbone.dtype):
        found = f"the same final {what} as a task of zeros on the same input ({difference(first, erased)})"
        raise overflow(artifact, backbone, f"{found}: its vectors normalise to nothing")


def is_same(first: torch.Tensor, second: torch.Tensor, dtype: torch.dtype) -> bool:
    """Equal to within rounding in `dtype`, relative to the larger values."""
    return float((first - second).abs().max()) <= tolerance(dtype) * scale(first)


def difference(first: torch.Tensor, second: torch.Tensor) -> str:
    return f"they differ by {float((first - second).abs().max()):.2e} in values up to {scale(first):.3g}"


def scale(vector: torch.Tensor) -> float:
    return max(1.0, float(vector.abs().max()))


def tolerance(dtype: torch.dtype) -> float:
    """Relative differences at or below this are rounding: a few units in the last place of the dtype."""
    return ROUNDING_UNITS * torch.finfo(dtype).eps


def classify_request(
    request_id: str, input_ids: list[int], task: TaskArtifact, prompts_as_kv: bool, sink: OutputSink, backbone: Backbone
) -> Request:
    """A classification task's probe row: its head's probabilities on the probe input."""
    request = Request(request_id, input_ids, SamplingParams(max_new_tokens=1), 0, sink, kind=backbone.kind,
                      job=Job.CLASSIFY, head_type=task.record.task_type)  # fmt: skip
    request.rows = [Sequence(request, task, 0, backbone.kind.has_kv_prefix(task, prompts_as_kv))]
    return request


def partial_sink(probe: Probe, request_id: str) -> Callable[[EngineOutput], None]:
    return lambda output: probe.on_output(request_id, output)


def check_positions(artifact: TaskArtifact, num_input: int, backbone: Backbone) -> None:
    """A task with more virtual tokens than the backbone has positions could never run a row."""
    num_virtual = artifact.record.num_virtual_tokens
    room = backbone.position_room
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
