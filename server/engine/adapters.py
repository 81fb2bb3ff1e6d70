"""LoRA and IA3 tasks on the device: their weights in a pool, and each token's delta applied in the shared pass.

The pool keeps each task version's per-module weights on the device, in the backbone's dtype, least recently used
first, at most `max_loras` of them and within a byte budget (as vLLM's `max_loras`). A running row holds a
reference to its task's weights (the scheduler takes it when it admits the row and gives it back when the row
finishes or is preempted), so weights in use are never evicted; the scheduler admits a row only while the
distinct tasks held stay within `max_loras`.

The backbone's modules are never edited: a forward hook on each target module (a pre-hook for IA3's feedforward
modules, which scale the input) reads which tokens of the current pass belong to which task (`AdapterStep`) and
applies each task's delta to its own tokens only, grouped by task as Punica's and S-LoRA's segmented kernels do (on
the CPU, a gather, two small matmuls and a scatter-add per task and module). Tokens of rows with no such task
(prompt, prefix and bare rows) pass untouched. The arithmetic is PEFT's: LoRA adds `lora_B(lora_A(x)) * scaling`
to the module's output; IA3 multiplies the output (or a feedforward module's input) by its vector.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from prompt_store.types import IA3Weights, LoraWeights, TaskArtifact, TaskKey, nbytes
from server.engine.adapter_slots import AdapterSlots
from server.engine.errors import UnservableTarget


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
class Group:
    """One task's tokens in the current pass: their indices in the flattened token dimension (None: every token)."""

    adapter: DeviceAdapter
    index: torch.Tensor | None


@dataclass(slots=True)
class AdapterStep:
    """Which task each token of the model's current pass uses: set by the runner around each call of the model."""

    groups: list[Group] = field(default_factory=list)
    num_tokens: int = 0
    width: int | None = None  # rows padded to this many tokens ([R, W]); None: one packed stream
    sources: dict[int, tuple[list[Group], int]] = field(default_factory=dict)  # another stream's (cross-attention)

    def groups_for(self, x: torch.Tensor, name: str) -> list[Group]:
        """The groups of the stream x belongs to whose task adapts module `name`: an encoder output that a decoder's
        cross-attention projects has its own (registered by its storage), anything else is the pass's token stream.
        UnservableTarget if the module sees something else (only those tasks' requests fail: see Engine.forward)."""
        if not self.groups and not self.sources:
            return []
        source = self.sources.get(x.data_ptr())
        groups, num_tokens = source or (self.groups, self.num_tokens)
        groups = [group for group in groups if name in group.adapter.modules]
        flat = x.numel() // x.shape[-1]
        is_padded = source is None and self.width is not None and x.dim() > 2
        if groups and (flat != num_tokens or (is_padded and x.shape[-2] != self.width)):  # [R, W, in] if padded
            found = f"which the backbone also runs on {flat} vectors that are not the pass's {num_tokens} tokens"
            raise UnservableTarget(name, [group.adapter.key for group in groups], found)
        return groups


def groups_of(adapters: list[DeviceAdapter | None], lengths: list[int], device: torch.device) -> list[Group]:
    """Rows laid one after another (row i: lengths[i] tokens, adapter adapters[i]) -> one group per adapter."""
    ranges: dict[TaskKey, tuple[DeviceAdapter, list[torch.Tensor]]] = {}
    start = 0
    for adapter, length in zip(adapters, lengths, strict=True):
        if adapter is not None and length:
            ranges.setdefault(adapter.key, (adapter, []))[1].append(torch.arange(start, start + length))
        start += length
    if len(ranges) == 1 and all(a is not None for a in adapters):
        ((adapter, _),) = ranges.values()
        return [Group(adapter, None)]
    return [Group(adapter, torch.cat(parts).to(device)) for adapter, parts in ranges.values()]


class AdapterHooks:
    """Forward hooks on the backbone's target modules, installed the first time a task that targets one is loaded."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.modules = modules  # by the names PEFT uses (before the engine wraps any attention layer)
        self.step = AdapterStep()
        self.handles: dict[str, list[Any]] = {}
        self.unservable: dict[str, str] = {}  # module -> why: found in a pass, refused at every later load

    def install(self, adapter: DeviceAdapter) -> None:
        """UnservableTarget, before any hook goes in, for a module the backbone lacks or a pass found unservable."""
        for name in adapter.modules:
            if name not in self.modules or name in self.unservable:
                found = self.unservable.get(name, "which the backbone has no module of that name for")
                raise UnservableTarget(name, [adapter.key], found)
        for name in adapter.modules:
            if name not in self.handles:
                module = self.modules[name]
                self.handles[name] = [
                    module.register_forward_pre_hook(partial_pre(self, name)),
                    module.register_forward_hook(partial_post(self, name)),
                ]

    @contextmanager
    def tokens(
        self, adapters: list[DeviceAdapter | None], lengths: list[int], device: torch.device, width: int | None = None
    ) -> Iterator[None]:
        """For the model calls inside: row i's lengths[i] tokens, in order, use adapters[i] (`width`: rows padded to
        it, so that a module run on as many vectors that are not tokens is still told apart)."""
        saved = self.step.groups, self.step.num_tokens, self.step.width
        self.step.groups = groups_of(adapters, lengths, device) if any(adapters) else []
        self.step.num_tokens, self.step.width = sum(lengths), width
        try:
            yield
        finally:
            self.step.groups, self.step.num_tokens, self.step.width = saved

    @contextmanager
    def source(self, states: torch.Tensor, adapters: list[DeviceAdapter | None], lengths: list[int]) -> Iterator[None]:
        """An encoder output [.., S, H] the decoder's cross-attention projects: its tokens' tasks."""
        groups = groups_of(adapters, lengths, states.device) if any(adapters) else []
        self.step.sources[states.data_ptr()] = (groups, sum(lengths))
        try:
            yield
        finally:
            self.step.sources.pop(states.data_ptr(), None)

    def scale_input(self, name: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """IA3's feedforward modules: each task's tokens' input times its vector."""
        x = args[0]
        groups = [g for g in self.step.groups_for(x, name) if isinstance(g.adapter.modules.get(name), DeviceIA3)]
        groups = [g for g in groups if g.adapter.modules[name].is_feedforward]  # type: ignore[union-attr]
        if not groups:
            return None
        flat = x.reshape(-1, x.shape[-1]).clone()  # [tokens, in]: the caller's tensor stays as it was
        for group in groups:
            scales = group.adapter.modules[name].scales  # type: ignore[union-attr]
            if group.index is None:
                flat = flat * scales
            else:
                flat.index_copy_(0, group.index, flat.index_select(0, group.index) * scales)
        return (flat.view(x.shape), *args[1:])

    def add_delta(self, name: str, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        """LoRA: each task's tokens gain lora_B(lora_A(x)) * scaling; IA3: their output times its vector."""
        x = args[0]
        groups = self.step.groups_for(x, name)
        if not groups:
            return None
        inputs = x.reshape(-1, x.shape[-1])  # [tokens, in]
        out = output.view(-1, output.shape[-1])  # [tokens, out], in place: the module's own fresh output
        for group in groups:
            weights = group.adapter.modules[name]
            if isinstance(weights, DeviceLora):
                picked = inputs if group.index is None else inputs.index_select(0, group.index)
                delta = F.linear(F.linear(picked, weights.lora_a), weights.lora_b) * weights.scaling
                out.add_(delta) if group.index is None else out.index_add_(0, group.index, delta)
            elif not weights.is_feedforward:
                if group.index is None:
                    out.mul_(weights.scales)
                else:
                    out.index_copy_(0, group.index, out.index_select(0, group.index) * weights.scales)
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
        return sum(adapter.nbytes for adapter in self.resident.values())
