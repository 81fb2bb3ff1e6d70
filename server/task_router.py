"""Ray Serve's request router for promptserve: a request goes to a replica that holds its task on the device (no
load, its keys and values shared with the rows already there); a task no replica holds to the one its id hashes to
(rendezvous hashing over the replicas' ids), so every router, each ingress replica's among them, loads a new task on
the same replica; and when those replicas are much busier than the least busy one, to the least busy replica (Ray's
own queue lengths decide among the replicas of a rank).

The task id reaches the router as the request's multiplexed model id: the ingress sets it on its call to the
engines from Ray's `serve_multiplexed_model_id` header or the body (server/ray_ingress.py); Ray's proxy hands a
router the header alone (the body goes to the replica unread). A request without a task is routed by load alone. Which
tasks a replica holds comes from its `record_routing_stats` (server/ray_serve.py), every
`request_routing_stats_period_s`; a task this router sent to a replica since counts as held there, so the requests
that follow a first one do not all load it elsewhere before the next report. Ray's API for this is alpha
(`ray.serve.request_router`, Ray 2.60 here).
"""

from __future__ import annotations

import hashlib
import random
import time
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

RESIDENT_TASKS = "resident_tasks"  # the routing stats' key: the task ids a replica holds on its device
MAX_REMEMBERED = 10_000  # tasks this router remembers sending (the oldest forgotten first)


def task_of(request: PendingRequest | None) -> str:
    return request.metadata.multiplexed_model_id if request is not None else ""


def rendezvous(task_id: str, replica_id: ReplicaID) -> int:
    """A task's weight on a replica: the replica of the highest weight is the task's, the same for every router, and
    a replica joining or leaving moves only the tasks it takes or had."""
    digest = hashlib.blake2b(f"{task_id}/{replica_id.unique_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class TaskAffinityRouter(RequestRouter):
    def initialize_state(self, imbalanced_threshold: int = 16, remember_s: float = 10.0, **kwargs: Any) -> None:
        """`imbalanced_threshold`: how many more queued requests than the least busy replica a holder may have and
        still be preferred; `remember_s`: how long a task sent to a replica counts as held there (about the
        routing stats' period: by then the replica's own report says)."""
        self.imbalanced_threshold = imbalanced_threshold
        self.remember_s = remember_s
        self.sent: dict[str, tuple[ReplicaID, float]] = {}  # task id -> where this router last sent it, and when

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """Ranks: the replicas holding the request's task, or its rendezvous replica when none does (if not much
        busier than the least busy replica), then every replica; the base class takes the shortest queue in the
        first rank with room (the first of equals, so each rank is shuffled)."""
        if pending_request is not None:  # every replica is in the ranks: a full house waits, then tries again
            pending_request.routing_context.should_backoff = True
        everyone = random.sample(candidate_replicas, len(candidate_replicas))
        task_id = task_of(pending_request)
        holders = [replica for replica in everyone if self.holds(replica, task_id)] if task_id else []
        if task_id and not holders:  # the replica every router picks for it
            holders = [max(everyone, key=lambda replica: rendezvous(task_id, replica.replica_id))]
        if holders and not self.is_imbalanced(holders, everyone):
            return [holders, everyone]
        return [everyone]

    def holds(self, replica: RunningReplica, task_id: str) -> bool:
        if task_id in replica.routing_stats.get(RESIDENT_TASKS, ()):
            return True
        sent = self.sent.get(task_id)
        return sent is not None and sent[0] == replica.replica_id and time.monotonic() - sent[1] < self.remember_s

    def is_imbalanced(self, holders: list[RunningReplica], candidates: list[RunningReplica]) -> bool:
        """The least busy holder has `imbalanced_threshold` more requests than the least busy replica (queue lengths
        as last probed; a replica not probed lately counts as idle)."""
        cache = self.replica_queue_len_cache

        def queue_len(replica: RunningReplica) -> int:
            return cache.get(replica.replica_id) or 0

        return min(map(queue_len, holders)) - min(map(queue_len, candidates)) > self.imbalanced_threshold

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        task_id = task_of(pending_request)
        if not task_id:
            return
        self.sent.pop(task_id, None)  # re-inserted last: the dict stays in order of sending
        self.sent[task_id] = (replica_id, time.monotonic())
        if len(self.sent) > MAX_REMEMBERED:
            del self.sent[next(iter(self.sent))]
