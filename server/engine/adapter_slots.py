"""The scheduler's side of the adapter pool (plain Python): which LoRA and IA3 task versions running rows hold, and
at most `max_loras` of them at once (vLLM's max_loras: the distinct adapters one batch may apply)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prompt_store.types import TaskKey


@dataclass(slots=True)
class AdapterSlots:
    max_loras: int = 16
    holds: dict[TaskKey, int] = field(default_factory=dict)  # rows holding each task version

    def can_hold(self, keys: set[TaskKey]) -> bool:
        """Whether rows of these tasks can run beside the rows running now."""
        return len(self.holds.keys() | keys) <= self.max_loras

    def hold(self, key: TaskKey) -> None:
        self.holds[key] = self.holds.get(key, 0) + 1

    def release(self, key: TaskKey) -> None:
        count = self.holds.get(key, 0)
        if count < 1:
            raise ValueError(f"release of task {key}: expected a reference held by hold; found none")
        if count == 1:
            del self.holds[key]
        else:
            self.holds[key] = count - 1

    def is_held(self, key: TaskKey) -> bool:
        return key in self.holds
