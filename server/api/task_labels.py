"""The values of the metrics' `task` label: bounded, so thousands of tasks cost a bounded number of series.

Task ids start with a letter or a digit, so the fixed values below, which start with `_`, never name a task.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

BACKBONE = "_backbone"  # the bare model, no task
ENSEMBLE = "_ensemble"  # one request over several tasks
OTHER = "_other"  # every task past the limit

TASK_HELP = "task: the task id, or _other for tasks past the first PROMPTSERVE_METRICS_MAX_TASKS seen"
REQUEST_HELP = f"{TASK_HELP}; _backbone for the bare model; _ensemble for a request over several tasks"


class TaskLabels:
    """The first `max_tasks` task ids seen get a label of their own, for good (a series keeps its meaning); later
    ones share `_other`. Asked from the event loop, the engine thread (step listener) and scrapes: locked."""

    def __init__(self, max_tasks: int) -> None:
        self.max_tasks = max_tasks
        self.named: set[str] = set()
        self.lock = threading.Lock()

    def of_task(self, task_id: str, admit: bool = True) -> str:
        """The task's label; `admit`: it may take a free slot (only what has served traffic should)."""
        with self.lock:
            if admit and task_id not in self.named and len(self.named) < self.max_tasks:
                self.named.add(task_id)
            return task_id if task_id in self.named else OTHER

    def of_request(self, task_ids: Sequence[str | None], admit: bool) -> str:
        """A request's label: its one task, `_backbone`, or `_ensemble` (request series count a request once, so
        summing over `task` gives the total; the cache series count an ensemble's members one by one)."""
        if len(task_ids) > 1:
            return ENSEMBLE
        task_id = task_ids[0]
        return BACKBONE if task_id is None else self.of_task(task_id, admit)
