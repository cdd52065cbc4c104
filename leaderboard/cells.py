"""A table's cells: a card's value with the interval its record supports, and a recipe's mean.

A card's interval (DESIGN, "Statistics in tables"): over episodes, the task's own 95% interval;
over fine-tuning seeds, Student's t with n - 1 degrees of freedom (small n: never a bootstrap of
2-5 values); one seed, none. A recipe's cell is the mean over its cards, with the standard deviation
across pretraining seeds and the small-n interval of the mean. The samples (per episode or
fine-tuning seed) are kept, so that a Δ can pair them (``leaderboard/deltas.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from leaderboard.model import EPISODES, FT_SEEDS, PT_SEEDS, SAMPLES_OVER, Column, Estimate, Row, bounds, is_finite
from ringbench import stats


def make_cell(rec: Mapping[str, Any], metric: str) -> Estimate:
    """One card's value of ``metric`` (percentage points) with its interval and paired samples."""
    mean = float(rec["metrics"][metric])
    extra = rec.get("extra") or {}
    ci: Any = (rec.get("ci95") or {}).get(metric)
    reported = (mean - float(ci), mean + float(ci)) if is_finite(ci) else None
    named = extra.get("samples_over")
    over = named if named in SAMPLES_OVER else None  # what the record's samples are (test images, ...)
    per_episode = episode_samples(extra, metric)
    if per_episode:
        interval, method = (reported, "normal") if reported else stats.mean_interval(per_episode)
        return Estimate(mean, *bounds(interval), len(per_episode), over or EPISODES, method, samples=per_episode)
    per_seed = [float(s[metric]) for s in extra.get("per_seed") or [] if is_finite(s.get(metric))]
    if per_seed:
        sd = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None
        interval, method = stats.mean_interval(per_seed)
        return Estimate(mean, *bounds(interval), len(per_seed), over or FT_SEEDS, method, sd=sd, samples=per_seed)
    return Estimate(mean, *bounds(reported), method="reported" if reported else "")


def episode_samples(extra: Mapping[str, Any], metric: str) -> list[float] | None:
    """Per-episode values of ``metric`` in percentage points.

    Few-shot records keep ``extra["episode_accuracies"][source]`` (fractions, in episode order);
    their metrics are ``acc`` (one source), ``acc_<source>`` and ``acc_avg`` (the mean over
    sources, paired episode by episode). ``extra["per_episode"][metric]`` is in the metric's unit.
    """
    if (extra.get("per_episode") or {}).get(metric):
        return [float(v) for v in extra["per_episode"][metric]]
    by_source = extra.get("episode_accuracies") or {}
    if not by_source:
        return None
    if metric == "acc" and len(by_source) == 1:
        values = np.asarray(next(iter(by_source.values())), dtype=np.float64)
    elif metric.startswith("acc_") and metric[4:] in by_source:
        values = np.asarray(by_source[metric[4:]], dtype=np.float64)
    elif metric == "acc_avg" and len({len(v) for v in by_source.values()}) == 1:
        values = np.mean([np.asarray(v, dtype=np.float64) for v in by_source.values()], axis=0)
    else:
        return None
    return (100.0 * values).tolist() if len(values) else None


def row_cell(row: Row, col: Column, card_cells: Mapping[tuple[str, Column], Estimate]) -> Estimate | None:
    """A card row's cell is its card's; a recipe's is the mean over its cards that have the column,
    with the standard deviation across their pretraining seeds and the small-n interval of the mean."""
    found = [(card, card_cells[(card.sha256, col)]) for card in row.cards if (card.sha256, col) in card_cells]
    if not found:
        return None
    if len(found) == 1:
        card, estimate = found[0]
        return replace(estimate, seed=card.seed)
    means = [e.mean for _, e in found]
    interval, method = stats.mean_interval(means)
    lo, hi = bounds(interval)
    return Estimate(
        float(np.mean(means)),
        lo,
        hi,
        len(found),
        PT_SEEDS,
        method,
        sd=float(np.std(means, ddof=1)),
        by_seed={card.seed: e for card, e in found},
    )
