"""Interleaved timing for the benchmarks: ratios that two runs on a shared machine agree on.

Every round calls each contender once, in an order that rotates from round to round, so that a burst
of load from another process falls on all of them alike; the medians over rounds are compared.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping


def interleaved(contenders: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time (s) of each contender over ``rounds`` interleaved rounds (after ``warmup``)."""
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            contenders[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def machine_line() -> str:
    """The load the numbers were measured under: load averages, cores and torch's threads."""
    import torch

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"load average (1, 5, 15 min) {load}; {os.cpu_count()} cores; torch threads {torch.get_num_threads()}"
