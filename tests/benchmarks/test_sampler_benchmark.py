"""`python -m benchmarks.sampler` runs end to end on small sizes (its numbers are read, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks import sampler


def test_sampler_benchmark_times_every_kind_of_row_at_every_vocabulary(tmp_path: Path):
    out = tmp_path / "sampler.json"
    threads = torch.get_num_threads()
    try:
        assert sampler.main(["--rows", "8", "--vocab", "40", "1500", "--repeats", "2", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark sets one thread for the process
    results = json.loads(out.read_text())["results"]
    assert [(r["vocab"], r["kind"], r["num_rows"]) for r in results] == [
        (vocab, kind, 8) for vocab in (40, 1500) for kind in sampler.KINDS
    ]
    assert all(r["ms"] > 0 for r in results)
