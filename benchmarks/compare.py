"""A/B timing on a noisy machine: both sides in the same process, alternating A B A B, after warm-up; medians."""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")


@dataclass(slots=True)
class Paired(Generic[T, U]):
    label_a: str
    label_b: str
    runs_a: list[T]
    runs_b: list[U]
    score: Callable[[Any], float]  # higher is better, e.g. generated tokens per second

    @property
    def scores_a(self) -> list[float]:
        return [self.score(run) for run in self.runs_a]

    @property
    def scores_b(self) -> list[float]:
        return [self.score(run) for run in self.runs_b]

    @property
    def ratio(self) -> float:
        """median(A) / median(B): the headline figure."""
        return statistics.median(self.scores_a) / statistics.median(self.scores_b)

    @property
    def pair_ratios(self) -> list[float]:
        """A_i / B_i of neighbouring runs, which saw about the same machine load: their spread shows the noise."""
        return [a / b for a, b in zip(self.scores_a, self.scores_b, strict=True)]

    def rescored(self, score: Callable[[Any], float]) -> Paired[T, U]:
        return Paired(self.label_a, self.label_b, self.runs_a, self.runs_b, score)

    def summary(self, unit: str) -> dict[str, Any]:
        pairs = self.pair_ratios
        return {
            "ratio": self.ratio,
            f"{self.label_a}_{unit}": statistics.median(self.scores_a),
            f"{self.label_b}_{unit}": statistics.median(self.scores_b),
            f"{self.label_a}_samples": self.scores_a,
            f"{self.label_b}_samples": self.scores_b,
            "pair_ratios": pairs,
            "pair_ratio_median": statistics.median(pairs),
            "pair_ratio_min": min(pairs),
            "pair_ratio_max": max(pairs),
        }


def alternate(
    label_a: str,
    run_a: Callable[[], T],
    label_b: str,
    run_b: Callable[[], U],
    score: Callable[[Any], float],
    repeats: int,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Paired[T, U]:
    """Warm both sides up, then run A B A B ... `repeats` times each; warm-up runs are not kept."""
    for _ in range(warmup):
        run_a(), run_b()
    runs_a: list[T] = []
    runs_b: list[U] = []
    for i in range(repeats):
        for label, run, runs in ((label_a, run_a, runs_a), (label_b, run_b, runs_b)):
            gc.collect()
            result = run()
            runs.append(result)  # type: ignore[arg-type]
            if progress is not None:
                progress(f"  {label} {i + 1}/{repeats}: {score(result):.1f}")
    return Paired(label_a, label_b, runs_a, runs_b, score)
