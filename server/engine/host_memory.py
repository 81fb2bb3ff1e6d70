"""On the CPU, freed memory stays in the process between steps, as CPU serving stacks arrange with tcmalloc or
jemalloc (vLLM's CPU backend, IPEX's launcher), here through glibc's own `mallopt`.

A CPU step allocates and frees its temporaries every step (a 512-token prefill's activations are megabytes each).
glibc's malloc serves a block past its mmap threshold with a fresh `mmap` and returns freed memory at the heap's top
to the system past its trim threshold; both thresholds move with the process's history. So whether a step's
temporaries page-fault in again depends on what else the process holds: on the `cpu` Llama with 16 LoRA tasks
running, prefill steps took 1.29-1.32 s against 1.06-1.09 s with 4 tasks, the same arithmetic (`to_dense` of the
linear layers' outputs 4x slower: fresh pages); with the thresholds fixed here, 1.08-1.12 against 1.06-1.07 (thread
CPU time, one thread, 9 prefill steps). The heap then keeps up to `TRIM_THRESHOLD` of freed memory.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit: blocks up to this come from the heap and are reused
TRIM_THRESHOLD = 1 << 30
MEMINFO = Path("/proc/meminfo")
V2, V1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
CGROUP_FILES = (  # (limit, usage, stat, its key for page cache the kernel can drop): cgroup v2, then v1
    (V2 / "memory.max", V2 / "memory.current", V2 / "memory.stat", "inactive_file"),
    (V1 / "memory.limit_in_bytes", V1 / "memory.usage_in_bytes", V1 / "memory.stat", "total_inactive_file"),
)
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2^63


def keep_freed_memory() -> bool:
    """Fix glibc's thresholds for this process; False where the C library has no `mallopt` (musl, macOS)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not done:
        logger.warning("glibc's mallopt refused the mmap and trim thresholds: CPU steps may page-fault their memory")
    return done


def available_bytes(
    meminfo: Path = MEMINFO, cgroups: tuple[tuple[Path, Path, Path, str], ...] = CGROUP_FILES
) -> int | None:
    """Host memory this process can still take: the system's MemAvailable, or less where the container's cgroup
    limit leaves less (its usage less the page cache the kernel can drop, the working set `docker stats` and the
    kubelet count: the model files just read are cache); None where neither can be read (not Linux)."""
    found = []
    try:
        line = next(line for line in meminfo.read_text().splitlines() if line.startswith("MemAvailable:"))
        found.append(int(line.split()[1]) * 1024)
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    for limit_file, usage_file, stat_file, reclaimable in cgroups:
        try:
            limit, usage = limit_file.read_text().strip(), int(usage_file.read_text())
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < UNLIMITED:
            found.append(max(0, int(limit) - usage + stat_value(stat_file, reclaimable)))
        break
    return min(found) if found else None


def stat_value(stat_file: Path, key: str) -> int:
    """A memory.stat entry (0 where it cannot be read)."""
    try:
        lines = stat_file.read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in lines if line.split()[:1] == [key]), 0)
