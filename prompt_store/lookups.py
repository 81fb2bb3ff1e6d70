"""Rate limits on looking up, in the shared store, a task id this process does not know (no stale 404).

A replica that misses an id asks the store before answering 404, so a task registered through another replica is
servable at once. A flood of unknown ids must not turn into a flood of store requests (an S3 LIST each), hence a
token bucket per process and a short negative cache per id.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

# Sustained lookups per second per process. Only ids registered elsewhere within the last poll interval need one
# (polling brings the rest), so this must cover one writer registering flat out (~40/s on S3 over loopback, see
# benchmarks/bench_store.py --replicas); an S3 LIST is a few ms on a nearby endpoint, and 50 replicas under a flood
# of unknown ids stay at 2,500 LISTs/s, under S3's 5,500 reads/s per prefix. A directory lookup is a listdir.
LOOKUPS_PER_S = 50.0
# Lookups allowed at once after a quiet spell: a client registering a batch of tasks elsewhere, then using them.
LOOKUP_BURST = 100
# An id just looked up and not found is answered 404 without asking again for this long: a client retrying one
# unknown id cannot eat the budget of the others. It is also the one delay a new task can see: a replica that
# missed the id less than this before the registration returned answers 404 until it expires.
NEGATIVE_CACHE_S = 0.5
MAX_NEGATIVE_ENTRIES = 10_000  # bounds memory under a flood of distinct ids (oldest dropped first)


class LookupLimiter:
    """Before a lookup, `recently_missed(task_id)` (answer 404 without asking) and `allow()` (False: the budget is
    spent, answer that the store cannot be asked now); `missed(task_id)` after one that found nothing. Thread-safe."""

    def __init__(
        self,
        per_second: float = LOOKUPS_PER_S,
        burst: int = LOOKUP_BURST,
        negative_s: float = NEGATIVE_CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_second = per_second
        self.burst = burst
        self.negative_s = negative_s
        self.num_refused = 0  # lookups skipped (a recent miss, or the budget spent): for logs and tests
        self._now = clock
        self._tokens = float(burst)
        self._refilled = self._now()
        self._missed: OrderedDict[str, float] = OrderedDict()  # task_id -> when the lookup found nothing
        self._lock = threading.Lock()

    def recently_missed(self, task_id: str) -> bool:
        with self._lock:
            missed = self._missed.get(task_id)
            if missed is None or self._now() - missed >= self.negative_s:
                return False
            self.num_refused += 1
            return True

    def allow(self) -> bool:
        """Take a lookup from the budget; False if it is spent."""
        with self._lock:
            now = self._now()
            self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.per_second)
            self._refilled = now
            if self._tokens < 1:
                self.num_refused += 1
                return False
            self._tokens -= 1
            return True

    def missed(self, task_id: str) -> None:
        with self._lock:
            self._missed.pop(task_id, None)
            self._missed[task_id] = self._now()
            while len(self._missed) > MAX_NEGATIVE_ENTRIES:
                self._missed.popitem(last=False)

    def found(self, task_id: str) -> None:
        """This process registered or found the id: forget a miss."""
        with self._lock:
            self._missed.pop(task_id, None)
