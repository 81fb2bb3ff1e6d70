"""Scripts that measure, never assert: `python -m benchmarks` (the engine's ratios) and `benchmarks.serving`."""
