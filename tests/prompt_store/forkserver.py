"""Drives tests/prompt_store/store_worker.py from a test: spawn writer processes, read their lines, SIGKILL them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class ForkServer:
    """Drives tests/prompt_store/store_worker.py: spawn writer processes, read their lines, SIGKILL them."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.prompt_store.store_worker"],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: dict[int, list[str]] = defaultdict(list)
        self.children: list[int] = []
        threading.Thread(target=self._read, daemon=True).start()
        wait_for(lambda: bool(self.lines[self.process.pid]), 120, "the fork server to start")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            pid, _, text = line.strip().partition(" ")
            if pid.isdigit():  # anything else is not ours (e.g. a stray print): never let the reader die
                self.lines[int(pid)].append(text)

    def spawn(self, *command: str) -> int:
        assert self.process.stdin is not None
        server_lines = self.lines[self.process.pid]
        num_before = len(server_lines)
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        wait_for(lambda: len(server_lines) > num_before, 10, "a spawned writer")
        self.children.append(int(server_lines[num_before].split()[1]))
        return self.children[-1]

    def wait_lines(self, pid: int, num: int, timeout_s: float = 20) -> list[str]:
        wait_for(lambda: len(self.lines[pid]) >= num or "failed" in self.lines[pid], timeout_s, f"writer {pid}")
        assert "failed" not in self.lines[pid], f"writer {pid} failed: {self.lines[pid]}"
        return self.lines[pid]

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not is_alive(pid), 10, f"writer {pid} to die")

    def close(self) -> None:
        for pid in self.children:
            if is_alive(pid):
                self.kill(pid)
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=10)


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
