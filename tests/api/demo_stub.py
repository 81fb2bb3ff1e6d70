"""Stands in for server.demo in the lifespan tests: registers one task."""

from __future__ import annotations

from tests.api.fake_engine import FakeEngine


def register_demo_tasks(engine: FakeEngine) -> None:
    engine.add_task("demo-task")
