"""register_demo_tasks fills an empty store with the demo tasks and never touches a store that has tasks."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.demo import ADAPTER_CONFIG, ADAPTER_MODEL, DEMO_TASKS, register_demo_tasks


@dataclass
class FakeEngine:
    tasks: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)

    def list_tasks(self) -> list[str]:
        return list(self.tasks)

    def register_task(self, task_id: str, adapter_config: bytes, adapter_model: bytes) -> tuple[str, bool]:
        created = task_id not in self.tasks
        self.tasks[task_id] = (adapter_config, adapter_model)
        return task_id, created


def test_register_demo_tasks_fills_an_empty_store() -> None:
    engine = FakeEngine()
    assert register_demo_tasks(engine) == list(DEMO_TASKS)
    for task_id, directory in DEMO_TASKS.items():
        assert engine.tasks[task_id] == (
            (directory / ADAPTER_CONFIG).read_bytes(),
            (directory / ADAPTER_MODEL).read_bytes(),
        )


def test_register_demo_tasks_leaves_a_store_with_tasks_alone() -> None:
    users_task = (b"{}", b"weights")
    engine = FakeEngine(tasks={"upper": users_task})
    assert register_demo_tasks(engine) == []
    assert engine.tasks == {"upper": users_task}


def test_register_demo_tasks_twice_registers_once() -> None:
    engine = FakeEngine()
    register_demo_tasks(engine)
    assert register_demo_tasks(engine) == []
    assert sorted(engine.tasks) == sorted(DEMO_TASKS)
