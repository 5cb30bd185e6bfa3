"""Benchmarks (`minimoe bench NAME`): speed measured against a peer or a physical limit in the
same process, printed as ratios. Never a timed test: CI does not run these.

Each benchmark is a function taking the parsed CLI args and printing its table; `BENCHES`
maps the CLI name to it.
"""

from __future__ import annotations

import statistics
import time


def timeit(fn, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of fn() in seconds, after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


BENCHES = {}
