"""Timing helper shared by the benchmark scripts (medians in one process, no assertions)."""

import statistics
import time


def run_times(fn, repeats: int, warmup: int = 1, sync=None) -> list:
    """Wall-clock seconds of each of ``repeats`` runs of ``fn()`` after ``warmup`` runs;
    ``sync`` (e.g. ``torch.cuda.synchronize``) is called after each run when given."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn, repeats: int, warmup: int = 1, sync=None) -> float:
    """Median of :func:`run_times`."""
    return statistics.median(run_times(fn, repeats, warmup, sync))
