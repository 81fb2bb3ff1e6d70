"""A long-lived process's background work on its task store: a refresh from the change feed every poll interval, on
a fixed beat, and on a thread of its own (a listing of the whole store must not hold up the refreshes) the
safety-net rescan, the clearing of what killed writers left behind, and the index snapshot and feed compaction a
registration asks for (they would hold up its answer)."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Protocol

logger = logging.getLogger(__name__)

# A polling process clears what killed writers left behind this often (the first time at a random moment of its
# first such period, so replicas started together spread their listings out; on S3 start-up does not: it lists
# every upload).
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

    def compact_feed(self, seq: int) -> None: ...


class Poller:
    """Two daemon threads working on one store until `stop`; `rescan_every_s` 0 or less: no safety-net rescans."""

    def __init__(self, store: PolledStore, interval_s: float, rescan_every_s: float) -> None:
        self.store = store
        self.stopped = threading.Event()
        self.wake = threading.Event()  # set by `stop` and `compact_feed`
        self._compact_at: int | None = None  # the feed entry whose writer asked for a compaction
        self._lock = threading.Lock()  # guards _compact_at
        self.threads = [
            threading.Thread(target=self._poll, args=(interval_s,), name="task-store-poll", daemon=True),
            threading.Thread(target=self._maintain, args=(rescan_every_s,), name="task-store-rescan", daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()
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

    def compact_feed(self, seq: int) -> None:
        """Have the store snapshot its index and compact its feed below entry `seq` (TaskStore.compact_feed) soon."""
        with self._lock:
            self._compact_at = seq
        self.wake.set()

    def _maintain(self, rescan_every_s: float) -> None:
        """The slow duties: the safety-net rescan, clearing what killed writers left, compacting the feed."""
        now = time.monotonic()
        next_rescan = now + rescan_every_s * random.uniform(0.5, 1.5) if rescan_every_s > 0 else float("inf")
        next_recover = now + RECOVER_EVERY_S * random.uniform(0.0, 1.0)
        while True:
            self.wake.wait(max(0.0, min(next_rescan, next_recover) - time.monotonic()))
            self.wake.clear()
            if self.stopped.is_set():
                return
            with self._lock:
                now, seq, self._compact_at = time.monotonic(), self._compact_at, None
            try:
                if seq is not None:
                    self.store.compact_feed(seq)
                if now >= next_rescan:
                    next_rescan = now + rescan_every_s * random.uniform(0.5, 1.5)
                    self.store.rescan()
                if now >= next_recover:
                    next_recover = now + RECOVER_EVERY_S
                    self.store.clear_leftovers()
            except Exception:
                logger.exception("maintaining the task store %s failed; retrying later", self.store.location)
