"""glibc's malloc keeps freed memory in the process on the CPU (server/engine/host_memory.py): the engine fixes the
thresholds when it starts on the CPU, and a C library without `mallopt`, or one that refuses, is no failure."""

from __future__ import annotations

import ctypes
import logging
import platform
from pathlib import Path
from typing import Any

import pytest

from server.engine import host_memory
from tests.engine.harness import Harness
from tests.fixtures import TinyBackbone


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_glibc_takes_the_thresholds() -> None:
    assert host_memory.keep_freed_memory()


class FakeLibc:
    def __init__(self, answer: int) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

        def mallopt(param: int, value: int) -> int:
            self.calls.append((param, value))
            return answer

        self.mallopt: Any = mallopt


def test_the_thresholds_set_are_glibcs_mmap_and_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = FakeLibc(1)
    monkeypatch.setattr(ctypes, "CDLL", lambda _name: libc)
    assert host_memory.keep_freed_memory()
    assert libc.calls == [(-3, 32 << 20), (-1, 1 << 30)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def test_a_refusal_is_a_warning_and_no_mallopt_is_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ctypes, "CDLL", lambda _name: FakeLibc(0))
    with caplog.at_level(logging.WARNING, logger="server.engine.host_memory"):
        assert not host_memory.keep_freed_memory()
    assert "mallopt refused" in caplog.text
    monkeypatch.setattr(ctypes, "CDLL", lambda _name: object())  # musl, macOS: no such function
    assert not host_memory.keep_freed_memory()


def test_the_engine_keeps_freed_memory_on_the_cpu(
    tiny_llama: TinyBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(True) or True)
    Harness(tiny_llama, tmp_path / "store")
    assert calls == [True]


def test_the_memory_left_is_the_systems_or_the_containers_when_less(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    limit, usage, stat = tmp_path / "memory.max", tmp_path / "memory.current", tmp_path / "memory.stat"
    usage.write_text("3000000000\n")
    cgroup = ((limit, usage, stat, "inactive_file"),)
    assert host_memory.available_bytes(meminfo, ()) == 20000000 * 1024
    limit.write_text("max\n")  # cgroup v2 with no limit
    assert host_memory.available_bytes(meminfo, cgroup) == 20000000 * 1024
    limit.write_text("8000000000\n")  # a container of 8 GB, 3 GB used (no memory.stat: all of it counted)
    assert host_memory.available_bytes(meminfo, cgroup) == 5000000000
    stat.write_text("anon 1000000000\nactive_file 500000000\ninactive_file 1500000000\n")
    assert host_memory.available_bytes(meminfo, cgroup) == 6500000000  # the droppable page cache is not in use
    limit.write_text(f"{(1 << 63) - 4096}\n")  # cgroup v1's "no limit"
    assert host_memory.available_bytes(meminfo, cgroup) == 20000000 * 1024
    assert host_memory.available_bytes(tmp_path / "missing", ()) is None
