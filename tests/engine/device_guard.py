"""A CPU stand-in for a CUDA run's device checks: while the guard is on, every tensor promptserve's own code creates
with a factory (torch.tensor, arange, zeros, ...) must name its device. On a GPU a factory without one makes a CPU
tensor, which either fails the step (mixed devices) or is copied to the GPU where it is used, a blocking transfer per
use; on a CPU it goes unnoticed. A tensor made by an operation takes its inputs' device, so with every factory
naming one, a CPU tensor in a GPU step is one the code asked for by name: the step's index tensors, built on the
host (kv_pool.HOST) and copied to the device. What the guard cannot see: a factory that names the wrong device."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

import server

ENGINE_ROOT = Path(server.__file__).resolve().parent
TORCH_ROOT = Path(torch.__file__).resolve().parent
FACTORIES = frozenset(
    {
        torch.tensor, torch.as_tensor, torch.arange, torch.zeros, torch.ones, torch.empty, torch.full, torch.rand,
        torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye, torch.empty_strided,
    }
)  # fmt: skip


@dataclass
class DeviceGuard(TorchFunctionMode):
    """Records each factory call made by promptserve's code without a device, as 'file:line function'."""

    unplaced: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            site = caller_in_engine()
            if site is not None:
                self.unplaced.append(site)
        return func(*args, **kwargs)


def caller_in_engine() -> str | None:
    """The first caller outside torch, if it is promptserve's own code."""
    frame = sys._getframe(2)
    while frame is not None and Path(frame.f_code.co_filename).resolve().is_relative_to(TORCH_ROOT):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return None
    path = Path(frame.f_code.co_filename).resolve()
    if not path.is_relative_to(ENGINE_ROOT):
        return None
    return f"{path.relative_to(ENGINE_ROOT.parent)}:{frame.f_lineno} {frame.f_code.co_name}"
