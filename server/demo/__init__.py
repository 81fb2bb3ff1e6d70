"""The built-in demo: PEFT tasks trained on the built-in default backbone, registered into an empty store.

The backbone and the tasks are made by this package's scripts (`pretrain`, `train_tasks`) and shipped as
assets; `evaluate` measures them. Importing this module is cheap: it reads files only when asked to.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).parent / "assets"
DEMO_BACKBONE_DIR = ASSETS_DIR / "backbone"
DEMO_TASKS: dict[str, Path] = {task_id: ASSETS_DIR / "tasks" / task_id for task_id in ("upper", "reverse", "json")}
ADAPTER_CONFIG, ADAPTER_MODEL = "adapter_config.json", "adapter_model.safetensors"


class TaskRegistry(Protocol):
    """The part of the engine's EngineClient this module uses."""

    def list_tasks(self) -> list[Any]: ...

    def register_task(self, task_id: str, adapter_config: bytes, adapter_model: bytes) -> Any: ...


def register_demo_tasks(engine: TaskRegistry) -> list[str]:
    """Register the demo tasks when the store holds no task at all; returns the ids registered.

    Never overwrites a user's tasks: a store with any task is left as it is. The tasks fit only the built-in
    default backbone, so call this only when the server runs that backbone (no model given).
    """
    if engine.list_tasks():
        logger.info("the task store is not empty: the demo tasks are not registered")
        return []
    registered = []
    for task_id, directory in DEMO_TASKS.items():
        engine.register_task(
            task_id, (directory / ADAPTER_CONFIG).read_bytes(), (directory / ADAPTER_MODEL).read_bytes()
        )
        registered.append(task_id)
    logger.info("registered the demo tasks %s", ", ".join(registered))
    return registered
