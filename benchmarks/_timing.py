"""Wall-clock medians, compiled memory and the machine's load for the
benchmark scripts (imported by them)."""

from __future__ import annotations

import os
import time

import jax
import numpy as np


def median_times(
    fns: dict,
    args: dict,
    repeats: int,
    min_seconds: float = 1.0,
    fresh: dict | None = None,
):
    """Median seconds per call of each ``fns[name](*args[name])``.

    The calls are interleaved, so that drifts of a shared machine's load hit
    every function alike, and each round starts one function later: a call
    right after a function that allocated large buffers runs measurably slower
    (up to 1.5x for a few-millisecond call on XLA CPU), and a fixed order would
    charge that to whichever function comes first. Short calls get more rounds,
    up to ``min_seconds`` of timing per function. ``fresh[name]``, where given,
    makes that function's arguments anew before each call, untimed (for a
    function that donates them).
    """
    names = list(fns)
    fresh = fresh or {}

    def timed(name):
        call_args = fresh[name]() if name in fresh else args[name]
        jax.block_until_ready(call_args)
        start = time.perf_counter()
        jax.block_until_ready(fns[name](*call_args))
        return time.perf_counter() - start

    warm = {}
    for name in names:
        timed(name)  # compile and warm up
        warm[name] = timed(name)
    rounds = max(repeats, min(200, int(min_seconds / max(max(warm.values()), 1e-6))))
    times = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name].append(timed(name))
    return {name: float(np.median(t)) for name, t in times.items()}


def temp_mib(fn, args) -> float:
    """The compiled temporaries of the jitted ``fn`` on ``args`` (arrays or
    ``ShapeDtypeStruct``s), MiB (``memory_analysis()``; compiles only)."""
    compiled = fn.lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, to print beside timings."""
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())
