"""The shared pass's linear layers of a float32 backbone on the CPU through oneDNN, where its kernels are faster.

torch's float32 matmul on the CPU is MKL's, and MKL takes its AVX-512 kernels only on Intel processors: on one
thread of the 2-vCPU AMD EPYC here it peaks near 120 GFLOPS, while oneDNN (inside torch, reached by the public
`Tensor.to_mkldnn` layout and `F.linear`) runs the same products at 140-260 GFLOPS from 16 rows up (a 32 x 512 x
1376 product: 259 against 437 us). A step's linear layers are most of a CPU step (71% on the `cpu` Llama), so the
engine runs them through oneDNN where that is faster, as CPU serving stacks do (vLLM's CPU backend, IPEX).

Each such layer keeps its module and its weight (names, hooks and every reader of `weight` are unchanged); it gains a
packed oneDNN copy of its weight (the linear layers' float32 bytes once more: the price, logged at start) and its
`forward` is replaced, as the LM head's is (lm_head.py). oneDNN has a fixed cost of about 30 us a call, so a product
under `MIN_MACS` multiply-adds (a few rows, a small model) takes torch's own matmul. Heads and the output layer run
apart from the shared pass and stay as they are.

`auto` times one product of the backbone's largest linear layer both ways at start and packs only where oneDNN is at
least `MIN_SPEEDUP` times faster (an Intel CPU's MKL is already at its peak: no copy for nothing), and only where the
copy takes at most half the host memory left (a container's limit counted): a float32 7B model on the CPU would
need 28 GiB more. Both kernels give
float32 sums in their own order, as MKL's own kernels do from one batch size to another: a row's result moves by
float32 rounding only (the exactness tests' tolerance), never by a batch mate's values.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch.nn import functional

from server.engine import host_memory
from server.engine.config import CpuLinears

logger = logging.getLogger(__name__)


MIN_MACS = 1 << 23  # below this a call's fixed cost loses: 32 x 512 x 512 is about here
MIN_SPEEDUP = 1.2
TIMED_ROWS = 64  # the product `auto` times: a decode step's rows, as many as a CPU batch holds
TIMED_REPEATS = 5


@dataclass(frozen=True, slots=True)
class Packed:
    """A linear layer's weight (and bias) in oneDNN's layout."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    min_rows: int  # calls of fewer rows take torch's product

    @classmethod
    def of(cls, module: torch.nn.Linear, min_macs: int = MIN_MACS) -> Packed:
        bias = None if module.bias is None else module.bias.detach().to_mkldnn()
        min_rows = -(-min_macs // (module.in_features * module.out_features))
        return cls(module.weight.detach().to_mkldnn(), bias, min_rows)

    def takes(self, x: torch.Tensor) -> bool:
        return x.dtype == torch.float32 and x.dim() >= 2 and x.numel() >= self.min_rows * x.shape[-1]


def forward(packed: Packed, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The module's output: oneDNN's product where the call is large enough to gain, else torch's."""
    if not packed.takes(x):
        return functional.linear(x, module.weight, module.bias)
    return functional.linear(x.contiguous().to_mkldnn(), packed.weight, packed.bias).to_dense()


def shared_linears(modules: dict[str, torch.nn.Module], names: list[str]) -> list[torch.nn.Linear]:
    """The plain float32 `nn.Linear` layers among the named modules (a subclass, e.g. a quantized one, is left)."""
    found = [modules[name] for name in names]
    return [m for m in found if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32]


def install(
    linears: list[torch.nn.Linear],
    device: torch.device,
    choice: CpuLinears,
    speedup_of: Callable[[torch.nn.Linear], float] | None = None,
    min_macs: int = MIN_MACS,
    available: int | None = None,
) -> int:
    """Run these linear layers through oneDNN (`choice` onednn, or auto where it is faster and the copy fits), each
    call of at least `min_macs` multiply-adds; returns how many layers. `available`: the host memory free (None:
    measured)."""
    if choice == "torch" or device.type != "cpu" or not linears or not torch.backends.mkldnn.is_available():
        return 0
    copied = sum(module.weight.numel() * module.weight.element_size() for module in linears)
    if choice == "auto" and not is_worth_it(linears, copied, speedup_of or timed_speedup, min_macs, available):
        return 0
    for module in linears:
        module.forward = partial(forward, Packed.of(module, min_macs), module)  # type: ignore[method-assign]
    logger.info("CPU linear layers: %d through oneDNN, %.1f MiB of packed weights", len(linears), copied / 2**20)
    return len(linears)


def is_worth_it(
    linears: list[torch.nn.Linear],
    copied: int,
    speedup_of: Callable[[torch.nn.Linear], float],
    min_macs: int,
    available: int | None,
) -> bool:
    """`auto`'s choice: some call can gain, the packed copy takes at most half the host memory left, and oneDNN is
    at least MIN_SPEEDUP times faster on the largest layer's product."""
    largest = max(linears, key=lambda m: m.in_features * m.out_features)
    if TIMED_ROWS * largest.in_features * largest.out_features < min_macs:
        return False  # no call of this model gains enough to pay for the copy
    room = host_memory.available_bytes() if available is None else available
    if room is not None and 2 * copied > room:
        logger.info(
            "CPU linear layers: torch's matmul (a packed copy of %.2f GiB would take more than half of the %.2f GiB "
            "of memory left; cpu_linears=onednn makes it anyway)", copied / 2**30, room / 2**30,
        )  # fmt: skip
        return False
    speedup = speedup_of(largest)
    shape = f"{TIMED_ROWS} x {largest.in_features} x {largest.out_features}"
    if speedup < MIN_SPEEDUP:
        logger.info("CPU linear layers: torch's matmul (oneDNN %.2fx on a %s product)", speedup, shape)
        return False
    logger.info("CPU linear layers: oneDNN, %.2fx torch's matmul on a %s product", speedup, shape)
    return True


@torch.inference_mode()
def timed_speedup(module: torch.nn.Linear) -> float:
    """torch's time over oneDNN's for one TIMED_ROWS-row product of this layer (each the best of a few)."""
    x = torch.randn(TIMED_ROWS, module.in_features, generator=torch.Generator().manual_seed(0))
    packed = Packed.of(module)
    stock = best_time(lambda: functional.linear(x, module.weight, module.bias))
    onednn = best_time(lambda: functional.linear(x.to_mkldnn(), packed.weight, packed.bias).to_dense())
    return stock / onednn


def best_time(run: Callable[[], object]) -> float:
    run()
    times = []
    for _ in range(TIMED_REPEATS):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)
