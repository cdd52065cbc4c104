"""The ring's parameters and its schedules of ``w_outer`` over training (Wu et al., ICLR 2021): pure functions,
read by pretraining (the methods set ``w_outer`` each epoch or step) and by the leaderboard's page (it plots them).

* :func:`ring_threshold`: the schedule of ``w_outer`` over training (per epoch);
* :func:`official_ring_threshold`: the official ring code's per-iteration schedules.
"""

from __future__ import annotations

import math

import numpy as np

from ringbench.errors import UserError

RING_SCHEDULES = ("constant", "linear", "step", "exponential")
RING_SCHEDULE_STYLES = ("epoch", "official")


def check_ring(w_outer: float, w_inner: float, num_samples: int | None = None) -> None:
    """The ring parameters on their own (before the number of negatives is known)."""
    if not 0 < w_outer <= 1:
        raise UserError(f"ring w_outer must be in (0, 1], got {w_outer}")
    if not 0 <= w_inner < 1:
        raise UserError(f"ring w_inner must be in [0, 1), got {w_inner}")
    if num_samples is not None and num_samples < 1:
        raise UserError(f"ring num_samples must be >= 1, got {num_samples}")


def _check_schedule(schedule: str, w_outer: float, w_outer_start: float) -> None:
    if schedule not in RING_SCHEDULES:
        raise UserError(f"unknown ring schedule {schedule!r}; expected one of {list(RING_SCHEDULES)}")
    check_ring(w_outer, 0.0)
    check_ring(w_outer_start, 0.0)


def ring_threshold(
    epoch: float,
    schedule: str = "constant",
    w_outer: float = 0.1,
    w_outer_start: float = 1.0,
    anneal_epochs: int = 100,
    steps: int = 4,
) -> float:
    """``w_outer`` at ``epoch`` (0-based): the ring shrinks from ``w_outer_start`` to ``w_outer``.

    ``constant``: always ``w_outer`` (the official default). Over ``anneal_epochs``, then constant:
    ``linear`` interpolation; ``step``: ``steps`` equal drops, the last one at ``anneal_epochs``;
    ``exponential``: geometric interpolation ``start * (end / start) ** progress``.
    """
    _check_schedule(schedule, w_outer, w_outer_start)
    if schedule == "constant":
        return float(w_outer)
    if anneal_epochs < 1:
        raise UserError(f"ring anneal_epochs must be >= 1, got {anneal_epochs}")
    progress = min(max(epoch / anneal_epochs, 0.0), 1.0)
    if schedule == "linear":
        return float(w_outer_start + (w_outer - w_outer_start) * progress)
    if schedule == "step":
        if steps < 1:
            raise UserError(f"ring schedule steps must be >= 1, got {steps}")
        progress = math.floor(progress * steps + 1e-9) / steps
        return float(w_outer_start + (w_outer - w_outer_start) * progress)
    return float(w_outer_start * (w_outer / w_outer_start) ** progress)


def official_ring_threshold(
    step: int,
    schedule: str = "constant",
    w_outer: float = 0.1,
    w_outer_start: float = 1.0,
    anneal_steps: int = 1,
) -> float:
    """``w_outer`` at optimiser step ``step`` (0-based) as the official ring code's threshold policies
    compute it: per iteration, over ``anneal_steps = int(anneal_epochs * int(N / B))`` iterations.

    ``linear``: ``anneal_steps`` evenly spaced values from ``w_outer_start`` down to ``w_outer``;
    ``step``: the values ``w_outer, w_outer + 0.1, ...`` up to ``w_outer_start`` (``numpy.arange``),
    from the largest, each held ``int(anneal_steps / count)`` iterations; ``exponential``:
    ``(start - end) * exp(-0.1 * step) + end`` (a decay of 0.1 per *iteration*); then ``w_outer``.
    """
    _check_schedule(schedule, w_outer, w_outer_start)
    if schedule == "constant":
        return float(w_outer)
    if anneal_steps < 1:
        raise UserError(f"ring anneal must last >= 1 iteration, got {anneal_steps}")
    if schedule == "linear":
        values = np.linspace(w_outer, w_outer_start, anneal_steps)[::-1]
    elif schedule == "step":
        levels = np.arange(w_outer, w_outer_start + 0.1, 0.1)[::-1]
        values = np.repeat(levels, int(anneal_steps / len(levels)))
    else:
        values = (w_outer_start - w_outer) * np.exp(-0.1 * np.arange(anneal_steps)) + w_outer
    return float(values[step]) if 0 <= step < len(values) else float(w_outer)
