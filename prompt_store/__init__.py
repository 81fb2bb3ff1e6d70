"""What a task IS: PEFT prompt-learning adapters, validated and stored durably (disk and CPU; the engine owns the
device side)."""

from prompt_store.adapter import TASK_ID_PATTERN, StoreLimits, parse_adapter, validate_task_id
from prompt_store.errors import InvalidTask, StoreError, TaskNotFound, TaskTooLarge
from prompt_store.materialize import materialize
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
    "materialize",
    "parse_adapter",
    "validate_task_id",
]
