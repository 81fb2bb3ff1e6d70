"""LoRA and IA3 tasks on the device: their weights in a pool, and each token's delta applied in the shared pass.

The pool keeps each task version's per-module weights on the device, in float32 (as PEFT keeps them in a bfloat16
model), least recently used first, at most `max_loras` of them and within a byte budget (as vLLM's `max_loras`). A
running row holds a reference to its task's weights (the scheduler takes it when it admits the row and gives it back
when the row finishes or is preempted), so weights in use are never evicted; the scheduler admits a row only while
the distinct tasks held stay within `max_loras`.

The backbone's modules are never edited: a forward hook on each target module (a pre-hook for IA3's feedforward
modules, which scale the input) applies each task's delta to its own tokens only. The runner sets which task each
token uses around each model call; that mapping is sorted by task once per call (`Grouping`) and shared by every
hooked module, as Punica's and S-LoRA's segmented kernels share theirs. Per module, one gather of the adapted tokens,
two batched matmuls over the tasks' stacked weights (a decode step's few tokens per task padded to [tasks, most,
in]; a prefill's uneven segments by `grouped_mm` with offsets), one scatter-add back; IA3 one multiply by a table of
the tasks' vectors gathered per token (ones for tokens with none). One task on every token skips all of that. A
per-task loop cost a gather, two matmuls and a scatter per task and module: with 16 tasks in a step that Python and
per-op overhead outweighed the deltas' arithmetic on the CPU.

The stacks (`ModuleStacks`: A^T and scaling * B^T zero-padded to the largest rank, which adds exact zeros) are
copies of the running tasks' weights, built when the step's set of tasks changes and kept while it does not (decode
steps repeat it; building them per step cost more than the matmuls). They go at the end of the step in which one of
their tasks is no longer held by any row, and their bytes count in the pool's (budget and gauges): a running task's
weights are resident once more, padded, while its rows run; a resident task with no rows costs only its weights.

Tokens of rows with no such task (prompt, prefix and bare rows) pass untouched. The arithmetic is PEFT's: LoRA adds
`lora_B(lora_A(x)) * scaling` to the module's output, IA3 multiplies the output (or a feedforward module's input) by
its vector, both in float32 and rounded once into a bfloat16 output, as PEFT's layers do.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from prompt_store.types import IA3Weights, LoraWeights, TaskArtifact, TaskKey, nbytes
from server.engine.adapter_slots import AdapterSlots
from server.engine.errors import UnservableTarget
from server.engine.kv_pool import HOST, to_device


@dataclass(frozen=True, slots=True)
class DeviceLora:
    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r]
    scaling: float


@dataclass(frozen=True, slots=True)
class DeviceIA3:
    scales: torch.Tensor  # [out], or [in] for a feedforward module
    is_feedforward: bool


@dataclass(slots=True)
class DeviceAdapter:
    """One task version's weights on the device, by module name."""

    key: TaskKey
    modules: dict[str, DeviceLora | DeviceIA3]
    nbytes: int
    is_retired: bool = False  # superseded or deleted: dropped on its last release

    @classmethod
    def of(cls, artifact: TaskArtifact, device: torch.device, dtype: torch.dtype) -> DeviceAdapter:
        """`dtype`: the backbone's; the weights are kept in float32 or wider, as PEFT keeps them
        (autocast_adapter_dtype) in a bfloat16 or float16 model."""
        dtype = torch.promote_types(dtype, torch.float32)
        modules: dict[str, DeviceLora | DeviceIA3] = {}
        for weights in artifact.modules:
            if isinstance(weights, LoraWeights):
                a, b = (t.to(device=device, dtype=dtype) for t in (weights.lora_a, weights.lora_b))
                modules[weights.module] = DeviceLora(a, b, weights.scaling)
            else:
                assert isinstance(weights, IA3Weights)
                modules[weights.module] = DeviceIA3(
                    weights.scales.to(device=device, dtype=dtype), weights.is_feedforward
                )
        tensors = [
            t for m in modules.values() for t in ((m.lora_a, m.lora_b) if isinstance(m, DeviceLora) else (m.scales,))
        ]
        return cls(artifact.key, modules, nbytes(tensors))


@dataclass(slots=True)
class Segments:
    """Some of the pass's tasks' tokens, sorted by task: the rows one grouped matmul takes. Where the tasks have
    about as many tokens each (a decode step's), also a padded layout for one batched matmul: [tasks, most, ...]."""

    index: torch.Tensor  # [n] the tokens' places in the flattened stream, task by task
    offsets: torch.Tensor  # [g] int32: where each task's tokens end in `index`
    padded: torch.Tensor | None  # [g * most] the token each padded row takes (a padding row repeats a real one)
    kept: torch.Tensor | None  # [n] the padded rows that are real, in `index`'s order (None: every row is)


@dataclass(slots=True)
class Grouping:
    """Which task each token of one stream uses: built once per model call (and per cross-attention source), and
    shared by every hooked module of that call."""

    tasks: list[DeviceAdapter]  # the distinct tasks, in order of first appearance
    num_tokens: int
    token_tasks: torch.Tensor  # [num_tokens] on the host: the token's place in `tasks`, -1 for none
    device: torch.device
    is_whole: bool  # one task, every token
    segments: dict[tuple[int, ...], Segments] = field(default_factory=dict)  # by the tasks taken (places in `tasks`)
    table_rows: torch.Tensor | None = None  # [num_tokens] on the device: IA3's per-task tables' row of each token

    @classmethod
    def of(cls, adapters: list[DeviceAdapter | None], lengths: list[int], device: torch.device) -> Grouping | None:
        """Rows laid one after another (row i: lengths[i] tokens, adapters[i]); None when no row has a task."""
        places: dict[TaskKey, int] = {}
        tasks: list[DeviceAdapter] = []
        row_tasks = []
        for adapter, length in zip(adapters, lengths, strict=True):
            if adapter is None or not length:
                row_tasks.append(-1)
                continue
            if adapter.key not in places:
                places[adapter.key] = len(tasks)
                tasks.append(adapter)
            row_tasks.append(places[adapter.key])
        if not tasks:
            return None
        token_tasks = torch.repeat_interleave(  # [num_tokens]
            torch.tensor(row_tasks, device=HOST), torch.tensor(lengths, device=HOST)
        )
        is_whole = len(tasks) == 1 and -1 not in row_tasks
        return cls(tasks, sum(lengths), token_tasks, device, is_whole)

    def segments_of(self, taken: tuple[int, ...]) -> Segments:
        """The tokens of the tasks `taken` (places in `tasks`, ascending), sorted by task; built once per call."""
        segments = self.segments.get(taken)
        if segments is None:
            segments = self.segments[taken] = self.sort(taken)
        return segments

    def sort(self, taken: tuple[int, ...]) -> Segments:
        num_taken = len(taken)
        lookup = torch.full((len(self.tasks) + 1,), num_taken, device=HOST)  # the last entry: a token with none
        lookup[list(taken)] = torch.arange(num_taken, device=HOST)
        token_groups = lookup[self.token_tasks]  # [num_tokens]: the token's group, num_taken if not taken
        counts = torch.bincount(token_groups, minlength=num_taken + 1)[:num_taken]
        num_rows, most = int(counts.sum()), int(counts.max())
        index = torch.argsort(token_groups, stable=True)[:num_rows]
        host = [index, counts.cumsum(0)]
        if num_taken * most <= 2 * num_rows:  # padding at most doubles the rows: one batched matmul is cheaper
            groups = token_groups[index]  # [n]
            kept = groups * most + torch.arange(num_rows, device=HOST) - (host[1] - counts)[groups]
            padded = index[:1].repeat(num_taken * most)
            padded[kept] = index
            host += [padded, kept]
        index, ends, *layout = to_device(host, self.device)
        if not layout:
            return Segments(index, ends.to(torch.int32), None, None)
        padded, kept = layout
        return Segments(index, ends.to(torch.int32), padded, None if num_taken * most == num_rows else kept)

    def table_rows_on_device(self) -> torch.Tensor:
        """[num_tokens]: each token's task place, len(tasks) (the tables' row of ones) for a token with none."""
        if self.table_rows is None:
            rows = torch.where(self.token_tasks < 0, len(self.tasks), self.token_tasks)
            self.table_rows = rows.to(self.device)
        return self.table_rows


@dataclass(frozen=True, slots=True)
class ModuleStacks:
    """One module's weights of the pass's tasks, stacked for grouped matmuls and table lookups: kept while the
    same tasks run (decode steps repeat them), rebuilt when they change."""

    tasks: list[DeviceAdapter]  # the pass's tasks (Grouping.tasks) they were built from (the same objects)
    lora_taken: tuple[int, ...]  # the places of the tasks with LoRA on this module
    lora_a: torch.Tensor | None  # [g, in, r]: each task's A^T, zero-padded to the largest rank r
    lora_b: torch.Tensor | None  # [g, r, out]: each task's scaling * B^T, zero-padded alike
    input_scales: torch.Tensor | None  # [tasks + 1, in]: IA3 feedforward vectors by task place, ones for none
    output_scales: torch.Tensor | None  # [tasks + 1, out]: IA3 output vectors alike

    @classmethod
    def of(cls, name: str, grouping: Grouping) -> ModuleStacks:
        weights = [task.modules.get(name) for task in grouping.tasks]
        loras = [(place, w) for place, w in enumerate(weights) if isinstance(w, DeviceLora)]
        lora_a = lora_b = None
        if loras:
            # zero rows of A and zero columns of B add exact zeros: a lower rank padded up computes the same delta
            lora_a = pad_sequence([w.lora_a for _, w in loras], batch_first=True).transpose(1, 2)
            lora_b = pad_sequence([w.lora_b.T * w.scaling for _, w in loras], batch_first=True)
        return cls(
            grouping.tasks,  # one list per pass, shared by its modules' stacks (drop_stacks asks it once)
            tuple(place for place, _ in loras),
            lora_a,
            lora_b,
            scale_table(weights, is_feedforward=True),
            scale_table(weights, is_feedforward=False),
        )

    def is_for(self, tasks: list[DeviceAdapter]) -> bool:
        """Built from these very weights (a key alone could name other weights: a task reloaded, the self-check's
        task rebuilt with fewer modules)."""
        return len(tasks) == len(self.tasks) and all(a is b for a, b in zip(tasks, self.tasks, strict=True))

    @property
    def nbytes(self) -> int:
        return nbytes(t for t in (self.lora_a, self.lora_b, self.input_scales, self.output_scales) if t is not None)


def scale_table(weights: list[DeviceLora | DeviceIA3 | None], is_feedforward: bool) -> torch.Tensor | None:
    """[tasks + 1, dim]: the IA3 vectors of the tasks with one of this side on the module, ones for the others and
    (the last row) for tokens with no task; None when no task has one."""
    vectors = [w.scales if isinstance(w, DeviceIA3) and w.is_feedforward == is_feedforward else None for w in weights]
    present = [v for v in vectors if v is not None]
    if not present:
        return None
    ones = torch.ones_like(present[0])
    return torch.stack([ones if v is None else v for v in vectors] + [ones])  # [tasks + 1, dim]


@dataclass(slots=True)
class AdapterStep:
    """Which task each token of the model's current pass uses: set by the runner around each call of the model."""

    grouping: Grouping | None = None
    num_tokens: int = 0
    width: int | None = None  # rows padded to this many tokens ([R, W]); None: one packed stream
    sources: dict[int, tuple[Grouping | None, int]] = field(default_factory=dict)  # another stream's (cross-attention)

    def grouping_for(self, x: torch.Tensor, name: str) -> Grouping | None:
        """The grouping of the stream x belongs to: an encoder output that a decoder's cross-attention projects has
        its own (registered by its storage), anything else is the pass's token stream. UnservableTarget if module
        `name`, which a task of the pass adapts, sees something else (only those tasks' requests fail: see
        Engine.forward)."""
        if self.grouping is None and not self.sources:
            return None
        source = self.sources.get(x.data_ptr())
        grouping, num_tokens = source or (self.grouping, self.num_tokens)
        flat = x.numel() // x.shape[-1]
        is_padded = source is None and self.width is not None and x.dim() > 2
        if grouping is not None and (flat != num_tokens or (is_padded and x.shape[-2] != self.width)):  # [R, W, in]
            keys = [task.key for task in grouping.tasks if name in task.modules]
            if keys:
                found = f"which the backbone also runs on {flat} vectors that are not the pass's {num_tokens} tokens"
                raise UnservableTarget(name, keys, found)
            return None
        return grouping


class AdapterHooks:
    """Forward hooks on the backbone's target modules, installed the first time a task that targets one is loaded."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.modules = modules  # by the names PEFT uses (before the engine wraps any attention layer)
        self.step = AdapterStep()
        self.handles: dict[tuple[str, str], Any] = {}  # by module and side
        self.stacks: dict[str, ModuleStacks] = {}  # by module: for the tasks of the last pass that ran it
        self.unservable: dict[str, str] = {}  # module -> why: found in a pass, refused at every later load

    def install(self, adapter: DeviceAdapter) -> None:
        """The output hook on each of the task's modules; the input hook only where IA3 scales the input (a hook
        costs its call on every pass). UnservableTarget, before any hook goes in, for a module the backbone lacks or
        a pass found unservable."""
        for name in adapter.modules:
            if name not in self.modules or name in self.unservable:
                found = self.unservable.get(name, "which the backbone has no module of that name for")
                raise UnservableTarget(name, [adapter.key], found)
        for name, weights in adapter.modules.items():
            module = self.modules[name]
            if (name, "output") not in self.handles:
                self.handles[name, "output"] = module.register_forward_hook(partial_post(self, name))
            if isinstance(weights, DeviceIA3) and weights.is_feedforward and (name, "input") not in self.handles:
                self.handles[name, "input"] = module.register_forward_pre_hook(partial_pre(self, name))

    @contextmanager
    def tokens(
        self, adapters: list[DeviceAdapter | None], lengths: list[int], device: torch.device, width: int | None = None
    ) -> Iterator[None]:
        """For the model calls inside: row i's lengths[i] tokens, in order, use adapters[i] (`width`: rows padded to
        it, so that a module run on as many vectors that are not tokens is still told apart)."""
        saved = self.step.grouping, self.step.num_tokens, self.step.width
        self.step.grouping = Grouping.of(adapters, lengths, device)
        self.step.num_tokens, self.step.width = sum(lengths), width
        try:
            yield
        finally:
            self.step.grouping, self.step.num_tokens, self.step.width = saved

    @contextmanager
    def source(self, states: torch.Tensor, adapters: list[DeviceAdapter | None], lengths: list[int]) -> Iterator[None]:
        """An encoder output [.., S, H] the decoder's cross-attention projects: its tokens' tasks."""
        self.step.sources[states.data_ptr()] = (Grouping.of(adapters, lengths, states.device), sum(lengths))
        try:
            yield
        finally:
            self.step.sources.pop(states.data_ptr(), None)

    def stacks_of(self, name: str, grouping: Grouping) -> ModuleStacks:
        stacks = self.stacks.get(name)
        if stacks is None or not stacks.is_for(grouping.tasks):
            stacks = self.stacks[name] = ModuleStacks.of(name, grouping)
        return stacks

    def drop_stacks(self, is_held: Callable[[TaskKey], bool]) -> None:
        """Stacks holding a task no running row holds go (their tasks changed, or the batch ended). Called every
        step: each pass's task list, which all its modules' stacks share, is asked once."""
        is_kept: dict[int, bool] = {}
        for name, stacks in list(self.stacks.items()):
            tasks = stacks.tasks
            if id(tasks) not in is_kept:
                is_kept[id(tasks)] = all(is_held(task.key) for task in tasks)
            if not is_kept[id(tasks)]:
                del self.stacks[name]

    @property
    def stacked_bytes(self) -> int:
        return sum(stacks.nbytes for stacks in list(self.stacks.values()))

    def scale_input(self, name: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """IA3's feedforward modules: each token's input times its task's vector (as PEFT: in the vectors' dtype,
        rounded once to the input's)."""
        x = args[0]
        grouping = self.step.grouping_for(x, name)
        if grouping is None:
            return None
        flat = x.reshape(-1, x.shape[-1])  # [tokens, in]
        if grouping.is_whole:
            weights = grouping.tasks[0].modules.get(name)
            if not isinstance(weights, DeviceIA3) or not weights.is_feedforward:
                return None
            scaled = flat * weights.scales
        else:
            table = self.stacks_of(name, grouping).input_scales
            if table is None:
                return None
            scaled = flat * table.index_select(0, grouping.table_rows_on_device())
        return (scaled.to(x.dtype).view(x.shape), *args[1:])  # a new tensor: the caller's stays as it was

    def add_delta(self, name: str, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        """LoRA: each token gains its task's lora_B(lora_A(x)) * scaling; IA3: its output times the task's vector.
        As PEFT: computed in the weights' dtype (float32 in a bfloat16 model) and rounded once into the output."""
        x = args[0]
        grouping = self.step.grouping_for(x, name)
        if grouping is None:
            return None
        inputs = x.reshape(-1, x.shape[-1])  # [tokens, in]
        out = output.view(-1, output.shape[-1])  # [tokens, out], in place: the module's own fresh output
        if grouping.is_whole:
            return add_whole(grouping.tasks[0].modules.get(name), inputs, output, out)
        stacks = self.stacks_of(name, grouping)
        if stacks.lora_a is not None and stacks.lora_b is not None:
            segments = grouping.segments_of(stacks.lora_taken)
            delta = lora_deltas(inputs, segments, stacks.lora_a, stacks.lora_b)  # [n, out], in `index`'s order
            if delta.dtype == out.dtype:
                out.index_add_(0, segments.index, delta)
            else:
                out.index_copy_(0, segments.index, (out.index_select(0, segments.index) + delta).to(out.dtype))
        if stacks.output_scales is not None:
            out.mul_(stacks.output_scales.index_select(0, grouping.table_rows_on_device()))
        return output


def lora_deltas(inputs: torch.Tensor, segments: Segments, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """[n, out]: each token's lora_B(lora_A(x)) * scaling with its task's weights (a: [g, in, r], b: [g, r, out]),
    in the weights' dtype: one batched matmul pair over the padded layout, or a grouped pair over the segments."""
    if segments.padded is None:
        picked = inputs.index_select(0, segments.index).to(lora_a.dtype)  # [n, in], task by task
        hidden = F.grouped_mm(picked, lora_a, offs=segments.offsets)  # [n, r]
        return F.grouped_mm(hidden, lora_b, offs=segments.offsets)
    num_tasks = lora_a.shape[0]
    picked = inputs.index_select(0, segments.padded).to(lora_a.dtype).view(num_tasks, -1, inputs.shape[-1])
    delta = torch.bmm(torch.bmm(picked, lora_a), lora_b).flatten(0, 1)  # [g * most, out]
    return delta if segments.kept is None else delta.index_select(0, segments.kept)


def add_whole(
    weights: DeviceLora | DeviceIA3 | None, inputs: torch.Tensor, output: torch.Tensor, out: torch.Tensor
) -> torch.Tensor | None:
    """One task's delta on every token of the pass: no gather, no grouping."""
    if isinstance(weights, DeviceLora):
        out.add_(F.linear(F.linear(inputs.to(weights.lora_a.dtype), weights.lora_a), weights.lora_b) * weights.scaling)
    elif isinstance(weights, DeviceIA3) and not weights.is_feedforward:
        out.mul_(weights.scales)
    else:
        return None
    return output


def partial_pre(hooks: AdapterHooks, name: str) -> Any:
    return lambda module, args: hooks.scale_input(name, args)


def partial_post(hooks: AdapterHooks, name: str) -> Any:
    return lambda module, args, output: hooks.add_delta(name, args, output)


class AdapterCache:
    """The device pool of LoRA and IA3 weights: least recently used first, at most `max_loras` resident and within
    `budget_bytes`; weights a running row holds (`slots`, the scheduler's) are never evicted, whatever the budget."""

    def __init__(self, hooks: AdapterHooks, slots: AdapterSlots, budget_bytes: int) -> None:
        self.hooks = hooks
        self.slots = slots
        self.budget_bytes = budget_bytes
        self.resident: OrderedDict[TaskKey, DeviceAdapter] = OrderedDict()
        self.evicted: list[TaskKey] = []  # since the task cache last took its events
        self.num_evictions = 0

    def get(self, key: TaskKey) -> DeviceAdapter | None:
        self.drop_retired()
        adapter = self.resident.get(key)
        if adapter is not None:
            self.resident.move_to_end(key)
        return adapter

    def add(self, adapter: DeviceAdapter) -> None:
        self.hooks.install(adapter)
        self.resident[adapter.key] = adapter
        self.evict_to_budget()

    def evict_to_budget(self) -> None:
        """Unheld weights go, least recently used first, while more than max_loras are resident or their bytes
        exceed the budget."""
        for key in list(self.resident):
            if len(self.resident) <= self.slots.max_loras and self.resident_bytes <= self.budget_bytes:
                return
            if not self.slots.is_held(key):
                del self.resident[key]
                self.evicted.append(key)
                self.num_evictions += 1

    def retire(self, task_id: str, keep_version: int | None) -> None:
        """Every version of the task but `keep_version` goes now, or once no running row holds it."""
        for key in [key for key in self.resident if key[0] == task_id and key[1] != keep_version]:
            self.resident[key].is_retired = True
        self.drop_retired()

    def drop_retired(self) -> None:
        for key in [key for key, a in self.resident.items() if a.is_retired and not self.slots.is_held(key)]:
            del self.resident[key]

    @property
    def resident_bytes(self) -> int:
        """The weights' bytes, and the running tasks' stacked copies (AdapterHooks.stacks)."""
        return sum(adapter.nbytes for adapter in self.resident.values()) + self.hooks.stacked_bytes
