"""`python -m benchmarks.host_overhead` runs end to end on a few rows (its numbers are read, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks import host_overhead


def test_host_overhead_measures_every_workload_at_every_row_count(tmp_path: Path):
    out = tmp_path / "host.json"
    argv = ["--rows", "4", "8", "--steps", "2", "--warmup", "1", "--json", str(out)]
    threads = torch.get_num_threads()
    try:
        assert host_overhead.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark sets one thread for the process
    results = json.loads(out.read_text())["results"]
    assert [(r["workload"], r["num_rows"], r["num_steps"]) for r in results] == [
        (workload, rows, 2) for workload in host_overhead.WORKLOADS for rows in (4, 8)
    ]
    assert all(0 < r["sampling_ms"] <= r["host_ms"] for r in results)  # the sampler is timed, as part of the host
