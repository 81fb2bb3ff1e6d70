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
