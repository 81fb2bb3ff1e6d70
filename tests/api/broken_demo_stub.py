"""Stands in for a server.demo whose assets are missing."""

from __future__ import annotations

from tests.api.fake_engine import FakeEngine


def register_demo_tasks(engine: FakeEngine) -> None:
    raise FileNotFoundError("demo assets missing")
