"""`python -m benchmarks.bf16_tolerance` runs end to end on two-layer models of every family it measures (its gaps
are read, never asserted: they are the measurement)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bf16_tolerance


def test_bf16_tolerance_reports_both_gaps_per_family(capsys: pytest.CaptureFixture[str]):
    threads = torch.get_num_threads()
    try:
        assert bf16_tolerance.main(["--layers", "2", "--seeds", "1"]) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark sets one thread for the process
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[:2] for row in rows] == [[family, "2"] for family in bf16_tolerance.FAMILIES]
    for row in rows:
        assert int(row[2]) > 0 and all(float(value) >= 0 for value in row[3:9]) and float(row[9]) < 0
