"""LoRA and IA3 tasks on the device: their weights in a pool, and each token's delta applied in the shared pass.

The pool keeps each task version's per-module weights on the device, in float32 (as PEFT keeps them in a bfloat16
model), least recently used first, at most `max_loras` of them and within a byte budget (as vLLM's `max_loras`). A
running row holds a reference to its task's weights (the scheduler takes it when it admits the row and gives it back
when the row finishes or is preempted), so weights in use are never evicted; the scheduler admits a row only while
the distinct tasks held stay within `max_loras`.

The backbone's modules are never edited: a forward hook on each target module (a pre-hook for IA3's feedforward
modules, which scale the input) applies each task's delta to its own tokens only. The runner sets which task each
token uses around each model call; that mapping is sorted by task once per call (`Grouping`) and shared by every
hooked module, as Punica's and S-LoRA's segmented kernels share theirs. Per module, where the rows are short (a
decode step's), one gather of the adapted tokens, two batched matmuls over the tasks' stacked weights (a few tokens
per task padded to [tasks, most, in], or uneven segments by `grouped_mm` with offsets) and one scatter-add back; where
they are long (a prefill's), a matmul pair per run of one task's tokens at its own rank, added into those rows of the
output in place (no gather, scatter or padded rank: 1.5x cheaper there). IA3: one multiply by a table of the tasks'
vectors gathered per token (ones for tokens with none). One task on every token skips all of that. A per-task loop
cost a gather, two matmuls and a scatter per task and module: with 16 tasks in a decode step that Python and per-op
overhead outweighed the deltas' arithmetic on the CPU.

The stacks (`LoraStack`: A and scaling * B^T zero-padded to the largest rank, which adds exact zeros) are copies of
the running tasks' weights, one place per task: a task is copied in when a pass first runs it and keeps its place
while any row holds it (a step whose tasks change copies the newcomers only; rebuilding every task's copy cost more
than the matmuls). Its place is freed once no row holds it any more, at the start of the next step after that
step's rows are admitted (a batch that ends and the next one of the same tasks copy nothing), or when the engine is
idle; a stack with no task left goes; IA3's tables (`ScaleTables`) are rebuilt when the pass's tasks change. Their
bytes count in the pool's (budget and gauges): a running task's weights are resident once more, padded, while its
rows run (and a stack's free places with them); a resident task with no rows costs only its weights.

Tokens of rows with no such task (prompt, prefix and bare rows) pass untouched. The arithmetic is PEFT's: LoRA adds
`lora_B(lora_A(x)) * scaling` to the module's output, IA3 multiplies the output (or a feedforward module's input) by
its vector, both in float32 and rounded once into a bfloat16 output, as PEFT's layers do.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

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
    """Some of the pass's tokens sorted by their group (a task's place in a module's stack): the rows one grouped
    matmul takes. Where the groups have about as many tokens each (a decode step's), also a padded layout for one
    batched matmul: [groups, most, ...]."""

    index: torch.Tensor  # [n] the tokens' places in the flattened stream, group by group
    offsets: torch.Tensor  # [g] int32: where each group's tokens end in `index` (a group may have none)
    padded: torch.Tensor | None  # [g * most] the token each padded row takes (a padding row repeats a real one)
    kept: torch.Tensor | None  # [n] the padded rows that are real, in `index`'s order (None: every row is)
    padding: torch.Tensor | None  # the padded rows that are not (None: none is)
    ends: list[int] = field(default_factory=list)  # `offsets` on the host


@dataclass(frozen=True, slots=True)
class Run:
    """Consecutive tokens of the stream, [start, end), that take one group's weights."""

    start: int
    end: int
    group: int


@dataclass(slots=True)
class Grouping:
    """Which task each token of one stream uses: built once per model call (and per cross-attention source), and
    shared by every hooked module of that call."""

    tasks: list[DeviceAdapter]  # the distinct tasks, in order of first appearance
    num_tokens: int
    token_tasks: torch.Tensor  # [num_tokens] on the host: the token's place in `tasks`, -1 for none
    device: torch.device
    is_whole: bool  # one task, every token
    row_tasks: list[int]  # each row's place in `tasks`, -1 for none
    lengths: list[int]  # each row's tokens
    segments: dict[tuple[int, ...], Segments] = field(default_factory=dict)  # by each task's group (-1: none)
    runs: dict[tuple[int, ...], list[Run]] = field(default_factory=dict)  # alike
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
        return cls(tasks, sum(lengths), token_tasks, device, is_whole, row_tasks, lengths)

    def long_runs_of(self, groups: tuple[int, ...]) -> list[Run]:
        """The stretches of consecutive tokens of one group (rows of tasks with a group, neighbours of one task
        merged) if they have LONG_RUN_TOKENS or more on average, else none; built once per call for every module
        whose stack places the tasks alike."""
        runs = self.runs.get(groups)
        if runs is None:
            runs, start = [], 0
            for task, length in zip(self.row_tasks, self.lengths, strict=True):
                group = groups[task] if task >= 0 else -1
                if group >= 0 and length:
                    if runs and runs[-1].group == group and runs[-1].end == start:
                        runs[-1] = Run(runs[-1].start, start + length, group)
                    else:
                        runs.append(Run(start, start + length, group))
                start += length
            if sum(run.end - run.start for run in runs) < LONG_RUN_TOKENS * len(runs):
                runs = []
            self.runs[groups] = runs
        return runs

    def segments_of(self, groups: tuple[int, ...]) -> Segments:
        """The tokens of the tasks with a group (groups[i]: task i's, -1 for none; groups 0 .. max), sorted by
        group; built once per call for every module whose stack places the tasks alike."""
        segments = self.segments.get(groups)
        if segments is None:
            segments = self.segments[groups] = self.sort(groups)
        return segments

    def sort(self, groups: tuple[int, ...]) -> Segments:
        num_groups = max(groups) + 1
        lookup = torch.tensor([num_groups if g < 0 else g for g in groups] + [num_groups], device=HOST)  # last: none
        token_groups = lookup[self.token_tasks]  # [num_tokens]: the token's group, num_groups if none
        counts = torch.bincount(token_groups, minlength=num_groups + 1)[:num_groups]
        num_rows, most = int(counts.sum()), int(counts.max())
        index = torch.argsort(token_groups, stable=True)[:num_rows]
        host = [index, counts.cumsum(0)]
        if num_groups * most <= 2 * num_rows:  # padding at most doubles the rows: one batched matmul is cheaper
            sorted_groups = token_groups[index]  # [n]
            kept = sorted_groups * most + torch.arange(num_rows, device=HOST) - (host[1] - counts)[sorted_groups]
            padded = index[:1].repeat(num_groups * most)
            padded[kept] = index
            is_padding = torch.ones(num_groups * most, dtype=torch.bool, device=HOST)
            is_padding[kept] = False
            host += [padded, kept, is_padding.nonzero().squeeze(1)]
        host_ends = host[1].tolist()  # (on the host)
        index, ends, *layout = to_device(host, self.device)
        if not layout:
            return Segments(index, ends.to(torch.int32), None, None, None, host_ends)
        padded, kept, padding = layout
        if num_groups * most == num_rows:
            return Segments(index, ends.to(torch.int32), padded, None, None, host_ends)
        return Segments(index, ends.to(torch.int32), padded, kept, padding, host_ends)

    def table_rows_on_device(self) -> torch.Tensor:
        """[num_tokens]: each token's task place, len(tasks) (the tables' row of ones) for a token with none."""
        if self.table_rows is None:
            rows = torch.where(self.token_tasks < 0, len(self.tasks), self.token_tasks)
            (self.table_rows,) = to_device([rows], self.device)  # pinned, without blocking the host
        return self.table_rows


class LoraStack:
    """One module's LoRA weights of the running tasks, stacked for batched and grouped matmuls: A [places, rank, in]
    and scaling * B^T [places, rank, out], each zero-padded to the largest rank (zero rows of A and of B^T add exact
    zeros). A task keeps its place while its rows run: a task joining is copied into a free place and one leaving
    frees its own, so a step whose tasks change copies the newcomers' weights only (rebuilding every task's copy
    whenever the step's tasks changed cost more than the matmuls). The places double when full and halve when at
    most a quarter of them hold a task."""

    def __init__(self, weights: DeviceLora, num_places: int, rank: int) -> None:
        like = weights.lora_a
        self.lora_a = like.new_zeros(num_places, rank, like.shape[1])  # [places, rank, in]
        self.lora_b = like.new_zeros(num_places, rank, weights.lora_b.shape[0])  # [places, rank, out]
        self.tasks: list[DeviceAdapter | None] = [None] * num_places  # by place (None: free); keeps them alive
        self.ranks = [0] * num_places  # by place: the task's own rank (the rows past it are zeros)
        self.places: dict[int, int] = {}  # id(task) -> its place: the very weights, not a key (see `place`)
        self.last: tuple[list[DeviceAdapter], tuple[int, ...]] | None = None  # a pass's tasks and their groups

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]

    def place(self, name: str, task: DeviceAdapter) -> int:
        """The task's place, its weights copied into a free one the first time (a key alone could name other
        weights: a task reloaded, the self-check's task rebuilt with fewer modules)."""
        place = self.places.get(id(task))
        if place is not None:
            return place
        weights = task.modules[name]
        assert isinstance(weights, DeviceLora)
        rank = weights.lora_a.shape[0]
        if rank > self.rank or None not in self.tasks:
            self.resize(len(self.tasks) * (1 if None in self.tasks else 2), rank)
        place = self.tasks.index(None)
        self.lora_a[place, :rank] = weights.lora_a
        self.lora_a[place, rank:] = 0
        self.lora_b[place, :rank] = weights.lora_b.T * weights.scaling
        self.lora_b[place, rank:] = 0
        self.tasks[place], self.ranks[place] = task, rank
        self.places[id(task)] = place
        return place

    def resize(self, num_places: int, rank: int) -> None:
        """num_places places (the tasks' own moved to the first ones), padded to at least `rank`."""
        self.last = None
        kept = [task for task in self.tasks if task is not None]
        places = [self.places[id(task)] for task in kept]
        order = torch.tensor(places, device=self.lora_a.device, dtype=torch.long)
        old_a, old_b, old_rank = self.lora_a, self.lora_b, self.rank
        rank = max(old_rank, rank)
        self.lora_a = old_a.new_zeros(num_places, rank, old_a.shape[2])
        self.lora_b = old_b.new_zeros(num_places, rank, old_b.shape[2])
        self.lora_a[: len(kept), :old_rank] = old_a.index_select(0, order)
        self.lora_b[: len(kept), :old_rank] = old_b.index_select(0, order)
        self.ranks = [self.ranks[place] for place in places] + [0] * (num_places - len(kept))  # no read back
        self.tasks = [*kept, *[None] * (num_places - len(kept))]
        self.places = {id(task): place for place, task in enumerate(kept)}

    @torch.inference_mode()  # the stacks are the passes' (inference) tensors; the engine releases after its step
    def release(self, is_held: Callable[[TaskKey], bool]) -> bool:
        """Frees the places of tasks no running row holds, and moves the last tasks into them, so that the tasks
        held fill the first places (a batched matmul over the first places reads no departed task's weights);
        whether any task is left."""
        for place, task in enumerate(self.tasks):
            if task is not None and not is_held(task.key):
                self.tasks[place], self.last = None, None
                del self.places[id(task)]
        num_held = len(self.places)
        if num_held and 4 * num_held <= len(self.tasks):
            self.resize(2 * num_held, self.rank)
            return True
        holes = [place for place in range(num_held) if self.tasks[place] is None]
        movers = [place for place in range(num_held, len(self.tasks)) if self.tasks[place] is not None]
        if holes:
            to, of = (torch.tensor(places, device=self.lora_a.device) for places in (holes, movers))
            self.lora_a[to] = self.lora_a[of]
            self.lora_b[to] = self.lora_b[of]
            for hole, mover in zip(holes, movers, strict=True):
                task = self.tasks[mover]
                assert task is not None
                self.tasks[hole], self.ranks[hole], self.tasks[mover] = task, self.ranks[mover], None
                self.places[id(task)] = hole
        return bool(num_held)

    @property
    def nbytes(self) -> int:
        return nbytes([self.lora_a, self.lora_b])


@dataclass(frozen=True, slots=True)
class ScaleTables:
    """One module's IA3 vectors of the pass's tasks, by task place, for one table lookup per token: kept while the
    same tasks run (decode steps repeat them), rebuilt when they change."""

    tasks: list[DeviceAdapter]  # the pass's tasks (Grouping.tasks) they were built from (the same objects)
    input_scales: torch.Tensor | None  # [tasks + 1, in]: IA3 feedforward vectors by task place, ones for none
    output_scales: torch.Tensor | None  # [tasks + 1, out]: IA3 output vectors alike

    @classmethod
    def of(cls, name: str, grouping: Grouping) -> ScaleTables:
        weights = [task.modules.get(name) for task in grouping.tasks]
        return cls(grouping.tasks, scale_table(weights, is_feedforward=True), scale_table(weights, False))

    def is_for(self, tasks: list[DeviceAdapter]) -> bool:
        """Built from these very weights, in this order."""
        return are_same(tasks, self.tasks)

    @property
    def nbytes(self) -> int:
        return nbytes(t for t in (self.input_scales, self.output_scales) if t is not None)


def are_same(first: list[DeviceAdapter], second: list[DeviceAdapter]) -> bool:
    """The very same task objects (a key alone could name other weights), in the same order."""
    return len(first) == len(second) and all(map(operator.is_, first, second))


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
    scaled: dict[int, int] = field(default_factory=dict)  # an IA3-scaled copy of a source -> the source, for its call

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
        self.stacks: dict[str, LoraStack] = {}  # by module: the LoRA weights of the tasks running rows hold
        self.tables: dict[str, ScaleTables] = {}  # by module: the IA3 vectors of the last pass that ran it
        self.ia3_modules: set[str] = set()  # where some task loaded has IA3 (the others skip its tables)
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
            if isinstance(weights, DeviceIA3):
                self.ia3_modules.add(name)
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
            for copy in [copy for copy, of in self.step.scaled.items() if of == states.data_ptr()]:  # a failed call's
                del self.step.scaled[copy]
                self.step.sources.pop(copy, None)

    def lora_groups(self, name: str, grouping: Grouping) -> tuple[int, ...] | None:
        """Each pass task's place in the module's LoRA stack (-1: no LoRA here), newcomers placed; None if none."""
        stack = self.stacks.get(name)
        if stack is not None and stack.last is not None and are_same(stack.last[0], grouping.tasks):
            last = stack.last[1]  # the tasks of the pass before, in the same order (decode steps)
            return last if max(last) >= 0 else None
        groups = []
        for task in grouping.tasks:
            weights = task.modules.get(name)
            if not isinstance(weights, DeviceLora):
                groups.append(-1)
                continue
            if stack is None:  # room for every task of the pass that has LoRA here, at the largest rank
                loras = [w for w in (task.modules.get(name) for task in grouping.tasks) if isinstance(w, DeviceLora)]
                rank = max(w.lora_a.shape[0] for w in loras)
                stack = self.stacks[name] = LoraStack(weights, len(loras), rank)
            groups.append(stack.place(name, task))
        if stack is None:
            return None
        stack.last = (grouping.tasks, tuple(groups))
        return stack.last[1] if max(groups) >= 0 else None

    def tables_of(self, name: str, grouping: Grouping) -> ScaleTables | None:
        if name not in self.ia3_modules:
            return None
        tables = self.tables.get(name)
        if tables is None or not tables.is_for(grouping.tasks):
            tables = self.tables[name] = ScaleTables.of(name, grouping)
        return tables

    def drop_stacks(self, is_held: Callable[[TaskKey], bool]) -> None:
        """Called at the start of every step, after admission, and when the engine is idle: the stacks' places of
        tasks no running row holds are freed (a stack with none left goes), and IA3 tables holding such a task go.
        A pass's task list, which all its modules' tables share, is asked once."""
        for name, stack in list(self.stacks.items()):
            if not stack.release(is_held):
                del self.stacks[name]
        is_kept: dict[int, bool] = {}
        for name, tables in list(self.tables.items()):
            tasks = tables.tasks
            if id(tasks) not in is_kept:
                is_kept[id(tasks)] = all(is_held(task.key) for task in tasks)
            if not is_kept[id(tasks)]:
                del self.tables[name]

    @property
    def stacked_bytes(self) -> int:
        stacks = list(self.stacks.values())  # a copy: the gauges read it from another thread
        return sum(stack.nbytes for stack in stacks) + sum(tables.nbytes for tables in list(self.tables.values()))

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
            tables = self.tables_of(name, grouping)
            table = None if tables is None else tables.input_scales
            if table is None:
                return None
            scaled = flat * table.index_select(0, grouping.table_rows_on_device())
        copy = scaled.to(x.dtype).view(x.shape)  # a new tensor: the caller's stays as it was
        if (source := self.step.sources.get(x.data_ptr())) is not None:  # the module's output hook sees the copy
            self.step.sources[copy.data_ptr()] = source
            self.step.scaled[copy.data_ptr()] = x.data_ptr()
        return (copy, *args[1:])

    def add_delta(self, name: str, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        """LoRA: each token gains its task's lora_B(lora_A(x)) * scaling; IA3: its output times the task's vector.
        As PEFT: computed in the weights' dtype (float32 in a bfloat16 model) and rounded once into the output."""
        x = args[0]
        grouping = self.step.grouping_for(x, name)
        if self.step.scaled.pop(x.data_ptr(), None) is not None:  # a source's scaled copy (scale_input): done with
            self.step.sources.pop(x.data_ptr(), None)
        if grouping is None:
            return None
        inputs = x.reshape(-1, x.shape[-1])  # [tokens, in]
        out = output.view(-1, output.shape[-1])  # [tokens, out], in place: the module's own fresh output
        if grouping.is_whole:
            return add_whole(grouping.tasks[0].modules.get(name), inputs, output, out)
        groups = self.lora_groups(name, grouping)
        if groups is not None:
            stack = self.stacks[name]
            runs = grouping.long_runs_of(groups)
            if runs:
                add_runs(inputs, out, runs, stack)
            else:
                add_grouped(inputs, out, grouping.segments_of(groups), stack)
        tables = self.tables_of(name, grouping)
        if tables is not None and tables.output_scales is not None:
            out.mul_(tables.output_scales.index_select(0, grouping.table_rows_on_device()))
        return output


# Runs of at least this many tokens on average (a prefill's rows) take a matmul pair each at their task's own rank
# and add into the output in place; shorter ones (a decode step's) are gathered into one batched or grouped pair
# over the padded stack, whose per-call overhead beats a pair per run once runs are short.
LONG_RUN_TOKENS = 8


def add_runs(inputs: torch.Tensor, out: torch.Tensor, runs: list[Run], stack: LoraStack) -> None:
    """Each run's delta, x A^T (scaling B^T) at its task's own rank, added into its own rows of the output: no
    gather, no scatter, no padded rank; rounded once into a lower-precision output."""
    dtype = stack.lora_a.dtype
    for run in runs:
        rank = stack.ranks[run.group]
        lora_a, lora_b = stack.lora_a[run.group, :rank], stack.lora_b[run.group, :rank]  # [r, in], [r, out]
        hidden = inputs[run.start : run.end].to(dtype) @ lora_a.T  # [t, r]
        rows = out[run.start : run.end]
        if rows.dtype == dtype:
            rows.addmm_(hidden, lora_b)
        else:
            rows.copy_(torch.addmm(rows.to(dtype), hidden, lora_b))


def add_grouped(inputs: torch.Tensor, out: torch.Tensor, segments: Segments, stack: LoraStack) -> None:
    """Every token's delta, lora_B(lora_A(x)) * scaling with its group's weights, by one batched matmul pair over
    the padded layout or a grouped pair over the segments, in the weights' dtype, scattered into the output."""
    num_groups = len(segments.offsets)  # the places up to the last one the pass uses
    lora_a, lora_b = stack.lora_a[:num_groups].transpose(1, 2), stack.lora_b[:num_groups]  # [g, in, r], [g, r, out]
    if segments.padded is None:
        index = segments.index
        picked = inputs.index_select(0, index).to(lora_a.dtype)  # [n, in], group by group
        if has_grouped_mm(picked):
            delta = F.grouped_mm(F.grouped_mm(picked, lora_a, offs=segments.offsets), lora_b, offs=segments.offsets)
        else:
            delta = mm_by_group(picked, lora_a, lora_b, segments.ends)
    else:
        index = segments.padded
        picked = inputs.index_select(0, index).to(lora_a.dtype)  # [g * most, in]
        if segments.padding is not None:  # zero inputs: a padding row adds exact zeros to the token it repeats
            picked.index_fill_(0, segments.padding, 0)
        delta = torch.bmm(torch.bmm(picked.view(num_groups, -1, inputs.shape[-1]), lora_a), lora_b).flatten(0, 1)
    if delta.dtype == out.dtype:
        out.index_add_(0, index, delta)
        return
    if segments.kept is not None:  # rounded once into the output: every token once, the padding rows dropped
        delta, index = delta.index_select(0, segments.kept), segments.index
    out.index_copy_(0, index, (out.index_select(0, index) + delta).to(out.dtype))


def has_grouped_mm(inputs: torch.Tensor) -> bool:
    """Whether `grouped_mm` runs as one kernel here: on the CPU, and on CUDA in bfloat16 on Hopper and Blackwell
    (compute capability 9 and 10); elsewhere torch falls back to a matmul per group whose bounds it reads back from
    the device, a synchronisation per call (two per LoRA module in every layer). Before torch 2.9 it has none."""
    if not hasattr(F, "grouped_mm"):
        return False
    if inputs.device.type != "cuda":
        return True
    return inputs.dtype == torch.bfloat16 and torch.cuda.get_device_capability(inputs.device)[0] in (9, 10)


def mm_by_group(inputs: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, ends: list[int]) -> torch.Tensor:
    """inputs [n, in] group by group (group g's rows end at ends[g]), lora_a [g, in, r], lora_b [g, r, out] -> the
    groups' deltas [n, out]: `grouped_mm`'s pair as a matmul pair per group, at bounds known on the host."""
    delta = inputs.new_empty(inputs.shape[0], lora_b.shape[-1])
    start = 0
    for group, end in enumerate(ends):
        if end > start:
            torch.mm(inputs[start:end] @ lora_a[group], lora_b[group], out=delta[start:end])
        start = end
    return delta


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
