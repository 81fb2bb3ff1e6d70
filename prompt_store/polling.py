"""A long-lived process's background work on its task store: a refresh from the change feed every poll interval, on
a fixed beat, and on a thread of its own (a listing of the whole store must not hold up the refreshes) the
safety-net rescan and the clearing of what killed writers left behind."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Protocol

logger = logging.getLogger(__name__)

# A polling process also clears what killed writers left behind this often, not only at start-up (long-lived
# replicas would keep an S3 upload orphaned less than an hour before they started until their next restart).
RECOVER_EVERY_S = 3600.0
# The safety net under the change feed: a polling process also lists the whole store about this often (each wait
# drawn between half and one and a half times it, so replicas started together spread their listings out).
RESCAN_EVERY_S = 600.0


class PolledStore(Protocol):
    @property
    def location(self) -> str: ...

    def refresh(self) -> bool: ...

    def rescan(self) -> bool: ...

    def clear_leftovers(self) -> None: ...


class Poller:
    """Two daemon threads working on one store until `stop`; `rescan_every_s` 0 or less: no safety-net rescans."""

    def __init__(self, store: PolledStore, interval_s: float, rescan_every_s: float) -> None:
        self.store = store
        self.stopped = threading.Event()
        self.threads = [
            threading.Thread(target=self._poll, args=(interval_s,), name="task-store-poll", daemon=True),
            threading.Thread(target=self._maintain, args=(rescan_every_s,), name="task-store-rescan", daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopped.set()
        for thread in self.threads:
            if thread is not threading.current_thread():  # a listener may stop polling from a poll thread
                thread.join()

    def _poll(self, interval_s: float) -> None:
        due = time.monotonic() + interval_s
        while not self.stopped.wait(max(0.0, due - time.monotonic())):
            due = max(due + interval_s, time.monotonic())  # a fixed beat: a refresh's own time does not add to it
            try:
                self.store.refresh()
            except Exception:  # a flaky shared volume or S3 endpoint must not kill hot-loading for good
                logger.exception("refreshing the task store %s failed; retrying in %.1f s", self.store.location,
                                 interval_s)  # fmt: skip

    def _maintain(self, rescan_every_s: float) -> None:
        """The slow duties: the safety-net rescan, and clearing what killed writers left."""
        now = time.monotonic()
        next_rescan = now + rescan_every_s * random.uniform(0.5, 1.5) if rescan_every_s > 0 else float("inf")
        next_recover = now + RECOVER_EVERY_S
        while not self.stopped.wait(max(0.0, min(next_rescan, next_recover) - time.monotonic())):
            now = time.monotonic()
            try:
                if now >= next_rescan:
                    next_rescan = now + rescan_every_s * random.uniform(0.5, 1.5)
                    self.store.rescan()
                if now >= next_recover:
                    next_recover = now + RECOVER_EVERY_S
                    self.store.clear_leftovers()
            except Exception:
                logger.exception("maintaining the task store %s failed; retrying later", self.store.location)
