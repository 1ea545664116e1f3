"""Benchmark targets for `roam bench` (one module each)."""
