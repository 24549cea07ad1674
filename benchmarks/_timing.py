"""Wall-clock medians for the benchmark scripts (imported by them)."""

from __future__ import annotations

import time

import jax
import numpy as np


def median_times(fns: dict, args: dict, repeats: int, min_seconds: float = 1.0):
    """Median seconds per call of each ``fns[name](*args[name])``.

    The calls are interleaved, so that drifts of a shared machine's load hit
    every function alike, and each round starts one function later: a call
    right after a function that allocated large buffers runs measurably slower
    (up to 1.5x for a few-millisecond call on XLA CPU), and a fixed order would
    charge that to whichever function comes first. Short calls get more rounds,
    up to ``min_seconds`` of timing per function.
    """
    names = list(fns)
    warm = {}
    for name in names:
        jax.block_until_ready(fns[name](*args[name]))  # compile and warm up
        start = time.perf_counter()
        jax.block_until_ready(fns[name](*args[name]))
        warm[name] = time.perf_counter() - start
    rounds = max(repeats, min(200, int(min_seconds / max(max(warm.values()), 1e-6))))
    times = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            jax.block_until_ready(fns[name](*args[name]))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}
