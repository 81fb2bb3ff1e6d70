"""The task-affinity request router's choices, on stand-in replicas (what it reads of one: its id and its routing
stats) and Ray's own request records; the router on a live 2-replica application is in test_ray_serve.py."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("ray.serve")
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest

from server.task_router import RESIDENT_TASKS, TaskAffinityRouter

DEPLOYMENT = DeploymentID(name="promptserve", app_name="promptserve")


@dataclass
class Replica:
    name: str
    tasks: list[str] = field(default_factory=list)

    @property
    def replica_id(self) -> ReplicaID:
        return ReplicaID(unique_id=self.name, deployment_id=DEPLOYMENT)

    @property
    def routing_stats(self) -> dict[str, Any]:
        return {RESIDENT_TASKS: self.tasks}


def make_router(**kwargs: Any) -> TaskAffinityRouter:
    router = TaskAffinityRouter(DEPLOYMENT, DeploymentHandleSource.PROXY, use_replica_queue_len_cache=True)
    router.initialize_state(**kwargs)
    return router


def request(task_id: str = "") -> PendingRequest:
    return PendingRequest(args=[], kwargs={}, metadata=RequestMetadata("r", "r", multiplexed_model_id=task_id))


def choose(router: TaskAffinityRouter, replicas: list[Replica], task_id: str) -> list[set[str]]:
    async def ranks() -> list[set[str]]:
        chosen = await router.choose_replicas(replicas, request(task_id))  # type: ignore[arg-type]
        return [{replica.name for replica in rank} for rank in chosen]

    return asyncio.run(ranks())


def test_replicas_holding_the_task_come_first() -> None:
    replicas = [Replica("a", ["other"]), Replica("b", ["task"])]
    assert choose(make_router(), replicas, "task") == [{"b"}, {"a", "b"}]


def test_no_task_goes_to_every_replica() -> None:
    replicas = [Replica("a", ["other"]), Replica("b", ["task"])]
    assert choose(make_router(), replicas, "") == [{"a", "b"}]


def test_a_task_nobody_holds_goes_first_to_the_same_replica_from_every_router() -> None:
    replicas = [Replica(name) for name in "abcd"]
    picks = {task_id: choose(make_router(), replicas, task_id) for task_id in (f"task-{i}" for i in range(40))}
    assert all(len(ranks) == 2 and len(ranks[0]) == 1 and ranks[1] == set("abcd") for ranks in picks.values())
    assert all(choose(make_router(), replicas, task_id) == ranks for task_id, ranks in picks.items())  # any router
    assert {name for ranks in picks.values() for name in ranks[0]} == set("abcd")  # spread over the replicas
    # one replica leaving moves only the tasks it had
    kept = [replica for replica in replicas if replica.name != "d"]
    assert all(choose(make_router(), kept, task_id)[0] == ranks[0] for task_id, ranks in picks.items()
               if ranks[0] != {"d"})  # fmt: skip


def test_a_busy_holder_is_passed_over_for_the_least_busy() -> None:
    router = make_router(imbalanced_threshold=16)
    replicas = [Replica("a"), Replica("b", ["task"])]
    router.replica_queue_len_cache.update(replicas[0].replica_id, 0)
    router.replica_queue_len_cache.update(replicas[1].replica_id, 17)
    assert choose(router, replicas, "task") == [{"a", "b"}]
    router.replica_queue_len_cache.update(replicas[1].replica_id, 16)
    assert choose(router, replicas, "task") == [{"b"}, {"a", "b"}]


def test_a_task_just_sent_counts_as_held_until_the_replica_reports() -> None:
    router = make_router(remember_s=0.2)
    replicas = [Replica("a"), Replica("b")]
    (home,) = choose(router, replicas, "task")[0]
    sent_to = next(replica for replica in replicas if replica.name != home)  # not where its hash would send it
    asyncio.run(routed(router, "task", sent_to.replica_id))
    assert choose(router, replicas, "task") == [{sent_to.name}, {"a", "b"}]
    time.sleep(0.25)
    assert choose(router, replicas, "task") == [{home}, {"a", "b"}]


async def routed(router: TaskAffinityRouter, task_id: str, replica_id: ReplicaID) -> None:
    router.on_request_routed(request(task_id), replica_id, None)
