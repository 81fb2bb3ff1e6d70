"""Other processes writing to a store, for the crash and hot-loading tests.

`python -m tests.prompt_store.store_worker` imports torch and the store once, then forks one writer per stdin
line (a JSON list: command and arguments), so a test can start and SIGKILL many writers in a few seconds.
Every stdout line is `<pid> <text>`; a write is acknowledged (`acked ...`) only after the store call returned.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from itertools import count

from prompt_store.registry import TaskStore
from prompt_store.types import BackboneFingerprint


def emit(*fields: object) -> None:
    # One short line, one write(2) (print may split it): lines of processes sharing the pipe never interleave.
    os.write(sys.stdout.fileno(), (" ".join(map(str, [os.getpid(), *fields])) + "\n").encode())


def open_store(root: str, fingerprint: str) -> TaskStore:
    return TaskStore(root, BackboneFingerprint(**json.loads(fingerprint)))


def loop(root: str, fingerprint: str, prefix: str, *adapter_dirs: str) -> None:
    """Register until killed: a few ids of our own (versions pile up) and one id every writer shares."""
    store = open_store(root, fingerprint)
    for i in count():
        task_id = "shared" if i % 4 == 3 else f"{prefix}-{i % 3}"
        record, _ = store.register_dir(task_id, adapter_dirs[i % len(adapter_dirs)])
        emit("acked", record.task_id, record.version, record.sha256)


def register(root: str, fingerprint: str, task_id: str, adapter_dir: str) -> None:
    record, _ = open_store(root, fingerprint).register_dir(task_id, adapter_dir)
    emit("acked", record.task_id, record.version, record.sha256)


def delete(root: str, fingerprint: str, task_id: str) -> None:
    open_store(root, fingerprint).delete(task_id)
    emit("deleted", task_id)


def register_unannounced(root: str, fingerprint: str, task_id: str, adapter_dir: str) -> None:
    """Register, then wait to be SIGKILLed after the version is stored and before the change feed says so."""
    store = open_store(root, fingerprint)

    def killed_here(task_id: str, version: int | None, *carried: object) -> int:
        emit("stored", task_id, version)
        time.sleep(60)
        raise AssertionError("expected to be killed before announcing the change")

    store.backend.append_change = killed_here  # type: ignore[method-assign]
    store.register_dir(task_id, adapter_dir)


COMMANDS = {"loop": loop, "register": register, "delete": delete, "register_unannounced": register_unannounced}


def run_child(command: list[str]) -> None:
    code = 0
    try:
        COMMANDS[command[0]](*command[1:])
        emit("done")
    except BaseException:
        traceback.print_exc()
        emit("failed")
        code = 1
    finally:
        os._exit(code)  # never return into the parent's stdin loop


def main() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    emit("ready")
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            run_child(json.loads(line))
        emit("spawned", pid)


if __name__ == "__main__":
    main()
