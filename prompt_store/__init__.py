"""What a task IS: PEFT prompt-learning adapters, validated and stored durably (disk and CPU; the engine owns the
device side).

The package and the modules it imports load no torch (`prompt_store.materialize` does: import it from there), so the
server's start-up checks read the store's types and probe a store without the seconds torch takes to import.
"""

from prompt_store.adapter import TASK_ID_PATTERN, StoreLimits, parse_adapter, validate_task_id
from prompt_store.errors import InvalidTask, StoreError, TaskNotFound, TaskTooLarge
from prompt_store.registry import StoreEvent, TaskStore
from prompt_store.types import (
    BackboneFingerprint,
    CacheStats,
    DeviceTask,
    Method,
    TaskArtifact,
    TaskKey,
    TaskRecord,
)

__all__ = [
    "TASK_ID_PATTERN",
    "BackboneFingerprint",
    "CacheStats",
    "DeviceTask",
    "InvalidTask",
    "Method",
    "StoreError",
    "StoreEvent",
    "StoreLimits",
    "TaskArtifact",
    "TaskKey",
    "TaskNotFound",
    "TaskRecord",
    "TaskStore",
    "TaskTooLarge",
    "parse_adapter",
    "validate_task_id",
]
