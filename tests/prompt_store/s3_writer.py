"""A writer to SIGKILL mid-registration: `python -m tests.prompt_store.s3_writer LOCATION FINGERPRINT TASK DIR PAUSE`.

It registers one adapter directory and says on stdout what it is doing (`put <key>` before each object goes up),
so a test can kill it while a large upload is in flight (PAUSE "none") or between upload and commit ("commit").
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from prompt_store.registry import TaskStore
from prompt_store.s3 import S3Backend, StagedUpload
from prompt_store.types import BackboneFingerprint


def say(text: str) -> None:
    os.write(sys.stdout.fileno(), (text + "\n").encode())


def main(location: str, fingerprint: str, task_id: str, adapter_dir: str, pause: str) -> None:
    store = TaskStore(location, BackboneFingerprint(**json.loads(fingerprint)))
    backend = store.backend
    assert isinstance(backend, S3Backend)
    put, commit = backend._put, backend.commit

    def traced_put(key: str, data: bytes, **kwargs: Any) -> bool:
        say(f"put {key} {len(data)}")
        return put(key, data, **kwargs)

    def paused_commit(task: str, staged: StagedUpload) -> tuple[int, bool]:
        say("staged")
        time.sleep(60)  # killed here
        return commit(task, staged)

    backend._put = traced_put  # type: ignore[method-assign]
    if pause == "commit":
        backend.commit = paused_commit  # type: ignore[method-assign]
    record, _ = store.register_dir(task_id, adapter_dir)
    say(f"acked {record.version}")


if __name__ == "__main__":
    main(*sys.argv[1:])
