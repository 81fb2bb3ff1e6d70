"""The metrics' `task` label values: bounded, fixed once given, never a task id for the special values."""

from __future__ import annotations

import re

from prompt_store.adapter import TASK_ID_PATTERN
from server.api.task_labels import BACKBONE, ENSEMBLE, OTHER, TaskLabels


def test_first_tasks_keep_their_id_and_later_ones_share_other() -> None:
    labels = TaskLabels(max_tasks=2)
    assert [labels.of_task(t) for t in ("a", "b", "c", "a", "d", "b")] == ["a", "b", OTHER, "a", OTHER, "b"]


def test_task_not_admitted_takes_no_slot() -> None:
    labels = TaskLabels(max_tasks=1)
    assert labels.of_task("typo", admit=False) == OTHER
    assert labels.of_task("a") == "a"
    assert labels.of_task("a", admit=False) == "a"


def test_zero_limit_labels_every_task_other() -> None:
    assert TaskLabels(max_tasks=0).of_task("a") == OTHER


def test_request_labels_backbone_and_ensemble_without_taking_slots() -> None:
    labels = TaskLabels(max_tasks=1)
    assert labels.of_request((None,), admit=True) == BACKBONE
    assert labels.of_request(("a", "b"), admit=True) == ENSEMBLE
    assert labels.of_request(("c",), admit=True) == "c"


def test_special_values_can_never_be_task_ids() -> None:
    assert not any(re.fullmatch(TASK_ID_PATTERN, value) for value in (BACKBONE, ENSEMBLE, OTHER))
