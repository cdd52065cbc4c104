"""The statistics of Δ rows and marks: a variant against its plain twin, ties with a column's best
(Meta-Dataset's rule), † / ‡ against the random-initialisation row, and the replicate spreads that
``--power`` sizes a study from.

A Δ (DESIGN, "Statistics in tables") compares a card or recipe trained with conditional negatives
(the ring, HCL's hard negatives or DCL's debiased ones) with its plain twin (InfoNCE / NT-Xent).
Between recipes, cards are paired by pretraining seed: up to ``stats.SMALL_N`` seeds the interval is
Student's t over the seeds' differences (each carries its own evaluation noise, so both levels of
variance are in it); more seeds, the two-level bootstrap (seeds, then episodes or fine-tuning seeds
within each); no seed in common, Welch's t. Between single cards: paired over the same episodes or
the same fine-tuning seeds, by the same small-n rule. Significant (``*``) when the interval excludes
0; with one replicate there is no interval and no ``*``.
"""

from __future__ import annotations

import math

import numpy as np

from leaderboard.model import (
    PT_SEEDS,
    RANDOM,
    Column,
    DeltaCell,
    Estimate,
    Table,
    bounds,
    reference_row,
)
from ringbench import stats


def compare(
    plain: Estimate, variant: Estimate, n_boot: int = 10_000, rng: np.random.Generator | None = None
) -> DeltaCell:
    """``variant - plain`` with the interval the data support (see the module's docstring); refused
    (``refused`` says why; no interval, never significant) when the estimate lies outside its own
    interval: a record's metric then disagrees with the per-episode or per-seed samples the interval
    was made from, and neither number can be trusted."""
    return _checked(_compare(plain, variant, n_boot, rng or np.random.default_rng(0)))


def _checked(delta: DeltaCell) -> DeltaCell:
    """``delta``, or a refused one if its estimate is not inside its interval (NaN bounds included)."""
    if delta.lo is None or delta.hi is None:
        return delta
    slack = 1e-9 * max(1.0, abs(delta.diff))
    if delta.lo - slack <= delta.diff <= delta.hi + slack:
        return delta
    why = (
        f"the estimate {delta.diff:+.2f} lies outside its own 95% interval [{delta.lo:+.2f}, {delta.hi:+.2f}] "
        f"({delta.method} over {delta.over}): a record's metric disagrees with its samples"
    )
    return DeltaCell(delta.diff, refused=why)


def _compare(plain: Estimate, variant: Estimate, n_boot: int, rng: np.random.Generator) -> DeltaCell:
    if plain.by_seed is not None or variant.by_seed is not None:
        a = plain.by_seed if plain.by_seed is not None else {plain.seed: plain}
        b = variant.by_seed if variant.by_seed is not None else {variant.seed: variant}
        shared = [s for s in b if s in a and s is not None]
        if len(shared) == 1:
            return _compare(a[shared[0]], b[shared[0]], n_boot, rng)
        if len(shared) >= 2:
            per_seed = [b[s].mean - a[s].mean for s in shared]
            diff = float(np.mean(per_seed))
            if len(shared) <= stats.SMALL_N:
                lo, hi = bounds(stats.t_interval(per_seed))
                return DeltaCell(diff, lo, hi, len(shared), PT_SEEDS, "t")
            inner = [_paired(a[s], b[s]) for s in shared]
            groups = [d if d is not None else [b[s].mean - a[s].mean] for d, s in zip(inner, shared)]
            lo, hi = stats.two_level_bootstrap_ci(groups, n_boot, rng)
            return DeltaCell(diff, lo, hi, len(shared), PT_SEEDS, "two-level bootstrap")
        if plain.by_seed is not None and variant.by_seed is not None:  # no seed in common: unpaired
            interval = stats.welch_interval([e.mean for e in b.values()], [e.mean for e in a.values()])
            lo, hi = bounds(interval)
            return DeltaCell(variant.mean - plain.mean, lo, hi, min(len(a), len(b)), PT_SEEDS, "welch")
        return DeltaCell(variant.mean - plain.mean)
    diff = variant.mean - plain.mean
    d = _paired(plain, variant)
    if d is None:
        return DeltaCell(diff, n=1 if plain.n == 1 and variant.n == 1 else None, over=plain.over)
    interval, method = stats.mean_interval(d, n_boot, rng)
    lo, hi = bounds(interval)
    return DeltaCell(diff, lo, hi, len(d), plain.over, method)


def _paired(plain: Estimate, variant: Estimate) -> list[float] | None:
    """Per-unit differences when both cells hold samples over the same units, else None."""
    if (
        plain.samples
        and variant.samples
        and plain.over == variant.over
        and len(plain.samples) == len(variant.samples)
        and len(plain.samples) > 1
    ):
        return (np.asarray(variant.samples) - np.asarray(plain.samples)).tolist()
    return None


def ties_with_best(table: Table, n_boot: int = 10_000, rng: np.random.Generator | None = None) -> set:
    """Meta-Dataset's rule: in each column, every entry not significantly below the best one
    (the best included). An entry with no interval against the best cannot be shown to be below it.
    An implausible value (``Table.implausible``) is neither the best nor marked: a percentage of 2500
    would otherwise push every real entry out of the mark."""
    tied = set()
    for col in table.columns:
        present = [
            (r.key, table.cells[(r.key, col)])
            for r in table.rows
            if (r.key, col) in table.cells and (r.key, col) not in table.implausible
        ]
        if len(present) < 2:
            continue
        best_key, best = max(present, key=lambda kv: kv[1].mean)
        for key, cell in present:
            if key == best_key:
                tied.add((key, col))
                continue
            delta = compare(cell, best, n_boot, rng)
            if not delta.significant and not _intervals_apart(cell, best, delta):
                tied.add((key, col))
    return tied


def _intervals_apart(cell: Estimate, best: Estimate, delta: DeltaCell) -> bool:
    """With no paired test, two cells whose own 95% intervals do not overlap differ."""
    if delta.lo is not None or not (cell.has_interval and best.has_interval):
        return False
    return cell.hi < best.lo  # type: ignore[operator]


def versus_random(
    table: Table, n_boot: int = 10_000, rng: np.random.Generator | None = None
) -> tuple[set[tuple[str, Column]], set[tuple[str, Column]]]:
    """The cells significantly above, and those significantly below, their random-initialisation row's
    (same architecture and stem), by the same comparison as a Δ row: a trained card can be worse than
    none, and the table says so as plainly as it says the opposite."""
    above: set[tuple[str, Column]] = set()
    below: set[tuple[str, Column]] = set()
    for row in table.rows:
        base = reference_row(table, row, RANDOM)
        if base is None or base is row or row.published:
            continue
        for col in table.columns:
            if (row.key, col) in table.cells and (base.key, col) in table.cells:
                delta = compare(table.cells[(base.key, col)], table.cells[(row.key, col)], n_boot, rng)
                if delta.significant:
                    (above if delta.diff > 0 else below).add((row.key, col))
    return above, below


def replicate_sds(table: Table, col: Column) -> dict[str, tuple[float, str]]:
    """The standard deviation of one replicate's paired difference at each level, pooled over the
    column's Δ pairs (root mean of the variances), and where it came from; for ``--power``.

    Pretraining seeds: the seed-paired Δs of recipe pairs; without any, √2 × the standard deviation
    of a recipe's card means (two independent cards). Fine-tuning seeds and episodes: the per-unit
    differences of the pairs' cards (recipes: of each seed's two cards)."""
    seed_vars: list[float] = []
    unit_vars: dict[str, list[float]] = {}
    for delta in table.deltas:
        if (delta.plain, col) not in table.cells or (delta.variant, col) not in table.cells:
            continue
        plain, variant = table.cells[(delta.plain, col)], table.cells[(delta.variant, col)]
        a = plain.by_seed if plain.by_seed is not None else {plain.seed: plain}
        b = variant.by_seed if variant.by_seed is not None else {variant.seed: variant}
        shared = [s for s in b if s in a] if len(a) > 1 or len(b) > 1 else list(b)
        leaves = [(a[s], b[s]) for s in shared] if len(a) > 1 or len(b) > 1 else [(plain, variant)]
        if len(shared) >= 2:
            seed_vars.append(float(np.var([b[s].mean - a[s].mean for s in shared], ddof=1)))
        for x, y in leaves:
            d = _paired(x, y)
            if d is not None:
                unit_vars.setdefault(x.over, []).append(float(np.var(d, ddof=1)))
    out: dict[str, tuple[float, str]] = {}
    if seed_vars:
        out[PT_SEEDS] = (math.sqrt(float(np.mean(seed_vars))), f"{len(seed_vars)} seed-paired Δ row(s)")
    else:
        recipe_vars = [
            float(np.var([e.mean for e in c.by_seed.values()], ddof=1))
            for (_, c2), c in table.cells.items()
            if c2 == col and c.by_seed is not None and len(c.by_seed) >= 2
        ]
        if recipe_vars:
            out[PT_SEEDS] = (math.sqrt(2 * float(np.mean(recipe_vars))), f"√2 × {len(recipe_vars)} recipe(s)' sd")
    for over, variances in unit_vars.items():  # fine-tuning seeds, episodes, test images, low-shot samples
        out[over] = (math.sqrt(float(np.mean(variances))), f"{len(variances)} paired card(s)")
    return out
