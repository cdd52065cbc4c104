"""The statistics of the comparison tables: intervals, paired and two-level, ranks and power.

Pure functions on arrays. Which interval a table uses where (``leaderboard/cells.py`` and ``deltas.py``):

* few replicates (n <= ``SMALL_N``): a t-interval with n - 1 degrees of freedom, never a bootstrap,
  whose percentile intervals are too narrow for a handful of values (with 3 seeds differing by
  0.1, 2.0 and 0.3 a bootstrap excludes 0; the t-interval is -1.8 ... +3.4);
* many (episodes, usually hundreds): the percentile bootstrap of the paired differences;
* replicates at two levels (pretraining seeds, and episodes or fine-tuning seeds within each):
  the two-level bootstrap, resampling pretraining seeds and then the units within each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LEVEL = 0.95
SMALL_N = 10  # up to this many replicates: t-intervals, never a bootstrap


def t_interval(values: Sequence[float] | np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """Student-t interval of the mean of ``values`` (n - 1 degrees of freedom); None for n < 2."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return None
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return float(x.mean()) - half, float(x.mean()) + half


def welch_interval(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, level: float = LEVEL
) -> tuple[float, float] | None:
    """Welch's interval of mean(a) - mean(b) for independent samples; None unless both have n >= 2."""
    from scipy import stats

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        return None
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    diff = float(x.mean() - y.mean())
    if se == 0:
        return diff, diff
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))  # Welch–Satterthwaite
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return diff - half, diff + half


def paired_bootstrap_ci(
    differences: Sequence[float] | np.ndarray,
    n_boot: int = 10_000,
    rng: np.random.Generator | None = None,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (resampling the pairs)."""
    rng = rng or np.random.default_rng(0)
    d = np.asarray(differences, dtype=np.float64)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    means = d[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def two_level_bootstrap_ci(
    groups: Sequence[Sequence[float] | np.ndarray],
    n_boot: int = 10_000,
    rng: np.random.Generator | None = None,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile interval of the grand mean of nested replicates, by the two-level bootstrap.

    ``groups[i]`` holds the paired differences measured on pretraining seed ``i`` (one per episode
    or fine-tuning seed). Each replicate draws the seeds with replacement, then within each drawn
    seed its units with replacement, and averages the seed means: the interval carries the variance
    between pretraining runs and the evaluation's own (Davison & Hinkley 1997, section 3.8).
    """
    rng = rng or np.random.default_rng(0)
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    if not arrays or any(len(a) == 0 for a in arrays):
        raise ValueError("two_level_bootstrap_ci needs at least one group and no empty group")
    k = len(arrays)
    outer = rng.integers(0, k, size=(n_boot, k))
    seed_means = np.empty((n_boot, k))
    for i, values in enumerate(arrays):  # inner resamples for every draw of seed i, all at once
        drawn = outer == i
        count = int(drawn.sum())
        if count:
            inner = rng.integers(0, len(values), size=(count, len(values)))
            seed_means[drawn] = values[inner].mean(axis=1)
    means = seed_means.mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def mean_interval(
    values: Sequence[float] | np.ndarray, n_boot: int = 10_000, rng: np.random.Generator | None = None
) -> tuple[tuple[float, float] | None, str]:
    """The interval of a mean of (paired) values by the table's rule, and its method's name:
    n < 2 none; n <= SMALL_N the t-interval; more the percentile bootstrap."""
    n = len(values)
    if n < 2:
        return None, ""
    if n <= SMALL_N:
        return t_interval(values), "t"
    return paired_bootstrap_ci(values, n_boot, rng), "bootstrap"


def average_ranks(scores: Sequence[Sequence[float | None]]) -> list[tuple[float | None, int]]:
    """Per row: the mean over columns of its rank (1 = highest score, ties share the mean rank),
    and how many columns it was ranked in. ``scores[row][column]``; None = not run."""
    from scipy import stats

    rows = len(scores)
    cols = max((len(r) for r in scores), default=0)
    totals = [0.0] * rows
    counts = [0] * rows
    for c in range(cols):
        present = [r for r in range(rows) if c < len(scores[r]) and scores[r][c] is not None]
        if len(present) < 2:
            continue
        ranks = stats.rankdata([-float(scores[r][c]) for r in present])  # type: ignore[arg-type]
        for r, rank in zip(present, ranks):
            totals[r] += float(rank)
            counts[r] += 1
    return [(totals[r] / counts[r] if counts[r] else None, counts[r]) for r in range(rows)]


def paired_t_power(effect: float, n: int, alpha: float = 1 - LEVEL) -> float:
    """Power of the two-sided paired (one-sample) t-test with n pairs at standardised effect
    ``effect`` = Δ / σ_d, from the noncentral t distribution."""
    from scipy import stats

    if n < 2:
        return 0.0
    df = n - 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    nc = effect * math.sqrt(n)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def replicates_needed(
    delta: float, sd: float, power: float = 0.8, alpha: float = 1 - LEVEL, limit: int = 1_000_000
) -> int | None:
    """The smallest n whose paired t-test detects a mean difference ``delta`` with this power,
    given the standard deviation ``sd`` of one replicate's difference; None past ``limit``."""
    if delta <= 0 or not math.isfinite(sd) or sd < 0:
        raise ValueError(f"need delta > 0 and a finite sd >= 0, got delta={delta}, sd={sd}")
    if sd == 0:
        return 2
    effect = delta / sd
    low, high = 2, 2
    while paired_t_power(effect, high, alpha) < power:  # exponential search, then bisection
        low, high = high, high * 2
        if high > limit:
            return None
    while low < high:
        mid = (low + high) // 2
        if paired_t_power(effect, mid, alpha) >= power:
            high = mid
        else:
            low = mid + 1
    return high
