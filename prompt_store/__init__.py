"""What a task IS: PEFT prompt-learning adapters, validated, stored durably and cached on the device."""

from prompt_store.errors import InvalidTask, StoreError, TaskNotFound, TaskTooLarge
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
    "BackboneFingerprint",
    "CacheStats",
    "DeviceTask",
    "InvalidTask",
    "Method",
    "StoreError",
    "TaskArtifact",
    "TaskKey",
    "TaskNotFound",
    "TaskRecord",
    "TaskTooLarge",
]
