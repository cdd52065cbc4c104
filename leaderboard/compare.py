"""Comparison tables from result records: cards and recipes as rows, cells with honest intervals,
plain -> variant Δ rows, Meta-Dataset's ties with the best, and average ranks.

Pure functions on lists of records (see ``ringbench/store.py``), which describe themselves: units and
headline metrics (the metrics a table shows; every one for a record from before the field); rendering lives in
``leaderboard/cli.py``, the statistics in ``ringbench/stats.py``.

* **A card is its SHA-256.** Two cards with one name are two rows, shown as ``name@sha8``.
* **A recipe** is the cards whose pretraining configs differ only in ``train.seed``. The default
  view has a row per recipe: the mean over its cards, the standard deviation across pretraining
  seeds and their number; ``view="cards"`` has a row per card.
* **A column** is ``(task, metric, config, unit)``: records of one task run with different configs
  are never merged. Every value is in percentage points (``results.in_percent``).
* **A card's cell** is its record's value. Its interval: over episodes, the task's own 95%
  interval; over fine-tuning seeds, Student's t with n - 1 degrees of freedom; one seed, none.
* **A Δ row** compares a card or recipe trained with conditional negatives (the ring, HCL's hard
  negatives or DCL's debiased ones) with its plain twin (InfoNCE / NT-Xent). Between recipes, cards
  are paired by pretraining seed: up to ``SMALL_N`` seeds the interval is Student's t over the
  seeds' differences (each of which carries its own evaluation noise, so both levels of variance
  are in it); more seeds, the two-level bootstrap (seeds, then episodes or fine-tuning seeds
  within each). Between single cards: paired over the same episodes (few-shot: one episode seed
  gives the same episodes) or the same fine-tuning seeds, by the same small-n rule. Significant
  (``*``) when the interval excludes 0; with one replicate there is no interval and no ``*``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ringbench import stats
from ringbench.published import Published
from ringbench.store import PERCENT, in_percent, record_headline

# Families in the order the table shows them.
FAMILY_ORDER = ("detectron2", "fewshot", "linear")
# Losses that change which negatives count (ring: Wu et al. 2021; hcl: Robinson et al. 2021; dcl: Chuang
# et al. 2020), and the uniform-negative losses they are compared with.
VARIANT_LOSSES = ("ring", "hcl", "dcl")
PLAIN_LOSSES = ("nce", "ntxent")
TWIN_KEYS = ("method", "dataset", "arch", "epochs")  # what a variant shares with its plain twin

# Reference rows: a random initialisation and a supervised network frame a transfer table (MoCo's
# tables always carry the supervised ImageNet row); published numbers are rows without cards.
RANDOM, SUPERVISED = "random", "supervised"
REFERENCE_METHODS = (RANDOM, SUPERVISED)

# What an interval is over, as the tables abbreviate it.
EPISODES, FT_SEEDS, PT_SEEDS = "episodes", "fine-tuning seeds", "pretraining seeds"


@dataclass(frozen=True)
class Column:
    task: str
    metric: str
    config_hash: str
    config_label: str = ""  # the settings that differ from the task's other configs
    family: str = ""
    unit: str = PERCENT

    @property
    def label(self) -> str:
        base = f"{self.task} {self.metric}"
        if self.unit != PERCENT:
            base += f" ({self.unit})"
        return f"{base} [{self.config_label}]" if self.config_label else base


@dataclass
class Estimate:
    """A value with its interval: what it is over (``over``), how many of them (``n``) and how the
    interval was made (``method``). ``lo``/``hi`` are None when the data give no interval."""

    mean: float
    lo: float | None = None
    hi: float | None = None
    n: int | None = None
    over: str = ""
    method: str = ""
    sd: float | None = None  # the spread of the replicates (recipes: across pretraining seeds)
    samples: list[float] | None = None  # one value per episode or fine-tuning seed, for pairing
    by_seed: dict[Any, Estimate] | None = None  # recipes: each card's cell by pretraining seed
    seed: Any = None  # a card's cell: the card's pretraining seed

    @property
    def has_interval(self) -> bool:
        return self.lo is not None and self.hi is not None


@dataclass
class DeltaCell:
    diff: float
    lo: float | None = None
    hi: float | None = None
    n: int | None = None
    over: str = ""
    method: str = ""

    @property
    def significant(self) -> bool:
        return self.lo is not None and self.hi is not None and (self.n or 0) >= 2 and (self.lo > 0 or self.hi < 0)


@dataclass
class Card:
    sha256: str
    name: str  # as shown: the card's name, or name@sha8 when another card has that name
    seed: Any
    meta: dict[str, Any]
    created: str


@dataclass
class Row:
    key: str  # the card's SHA-256, or "recipe:<hash>"
    name: str
    cards: list[Card]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_recipe(self) -> bool:
        return len(self.cards) > 1

    @property
    def sha256(self) -> str:
        return self.cards[0].sha256 if len(self.cards) == 1 else ""

    @property
    def published(self) -> bool:
        """A published number's row: no card, its source in ``meta["source"]``."""
        return not self.cards

    @property
    def reference(self) -> str | None:
        """``"random"`` or ``"supervised"`` for a reference card's row, else None."""
        method = self.meta.get("method")
        return method if method in REFERENCE_METHODS and not self.published else None

    @property
    def family_key(self) -> tuple[Any, Any]:
        """Cards are compared with the reference rows of their own architecture and stem."""
        return (self.meta.get("arch"), self.meta.get("stem"))


@dataclass
class Delta:
    plain: str  # row keys
    variant: str
    cells: dict[Column, DeltaCell]


@dataclass
class Table:
    columns: list[Column]
    rows: list[Row]
    cells: dict[tuple[str, Column], Estimate]
    deltas: list[Delta]
    view: str = "recipes"
    tied: set[tuple[str, Column]] = field(default_factory=set)  # not significantly below the best
    ranks: dict[str, tuple[float | None, int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    above_random: set[tuple[str, Column]] = field(default_factory=set)  # significantly above the random row
    below_random: set[tuple[str, Column]] = field(default_factory=set)  # significantly below it
    normalised: bool = False  # cells are shares of the random -> supervised gap

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)

    def row_by_name(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.name == name), None)

    def best(self, column: Column) -> float | None:
        values = [c.mean for (_, col), c in self.cells.items() if col == column and _finite(c.mean)]
        return max(values) if values else None

    def methods(self) -> list[str]:
        """How the intervals shown were made, for the note under the table."""
        found = {(c.over, c.method) for c in self.cells.values() if c.has_interval}
        found |= {(d.over, d.method) for delta in self.deltas for d in delta.cells.values() if d.lo is not None}
        return [describe(over, method) for over, method in sorted(found)]


def describe(over: str, method: str) -> str:
    names = {
        "t": "Student's t (n - 1 df)",
        "bootstrap": "percentile bootstrap",
        "two-level bootstrap": "two-level bootstrap (seeds, then the units within each)",
        "normal": "the task's normal interval",
        "welch": "Welch's t (unpaired)",
        "reported": "the interval the record reports",
    }
    if over == PT_SEEDS and method == "t":
        return (
            "Student's t over pretraining seeds (for a Δ: over the seed-paired differences, each of which carries "
            "its own evaluation noise, so the interval holds both levels of variance)"
        )
    return f"{names.get(method, method)} over {over}" if over else names.get(method, method)


def build_table(
    records: Sequence[Mapping[str, Any]],
    tasks: Iterable[str] | None = None,
    all_metrics: bool = False,
    pairs: Sequence[tuple[str, str]] = (),
    view: str = "recipes",
    latest: bool = False,
    n_boot: int = 10_000,
    seed: int = 0,
) -> Table:
    """Rows = recipes (``view="recipes"``) or cards (``"cards"``), columns = (task, metric, config).

    A record's ``headline`` picks the metrics shown (``store.record_headline``; every metric with
    ``all_metrics``); ``pairs`` adds explicit ``(plain, variant)`` Δ rows (row names) on top of the
    twins found from the cards' metadata; ``latest`` keeps only the newest card of each name.
    """
    if view not in ("recipes", "cards"):
        raise ValueError(f"view must be 'recipes' or 'cards', got {view!r}")
    wanted = set(tasks) if tasks else None
    newest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for raw in records:
        if wanted is not None and raw["task"] not in wanted:
            continue
        rec = in_percent(raw)
        key = (_card_key(rec), rec["task"], rec.get("config_hash", ""))
        if key not in newest or str(rec.get("created", "")) >= str(newest[key].get("created", "")):
            newest[key] = rec
    warnings: list[str] = []
    cards = _cards(newest.values(), latest, warnings)
    chosen = {key: rec for key, rec in newest.items() if key[0] in cards}
    config_labels = _config_labels(chosen.values())
    columns: dict[Column, None] = {}
    card_cells: dict[tuple[str, Column], Estimate] = {}
    for (sha, task, cfg), rec in chosen.items():
        metrics = rec.get("metrics") or {}
        for metric in list(metrics) if all_metrics else record_headline(rec):
            if not _finite(metrics.get(metric)):
                continue
            unit = str((rec.get("units") or {}).get(metric, PERCENT))
            column = Column(task, metric, cfg, config_labels.get((task, cfg), ""), rec.get("family", ""), unit)
            columns[column] = None
            card_cells[(sha, column)] = make_cell(rec, metric)
    ordered_columns = sorted(columns, key=_column_order)
    warnings += _unit_warnings(chosen.values(), ordered_columns)
    rows = _card_rows(cards) if view == "cards" else _recipe_rows(cards, warnings)
    rows.sort(key=lambda r: (REFERENCE_METHODS.index(r.reference) if r.reference else len(REFERENCE_METHODS), r.name))
    cells: dict[tuple[str, Column], Estimate] = {}
    for row in rows:
        for col in ordered_columns:
            estimate = row_cell(row, col, card_cells)
            if estimate is not None:
                cells[(row.key, col)] = estimate
    rng = np.random.default_rng(seed)
    names = {r.name: r.key for r in rows}
    explicit = [(names[p], names[v]) for p, v in pairs if p in names and v in names]
    unique_pairs = list(dict.fromkeys(find_pairs(rows, same_seed=view == "cards") + explicit))
    deltas = [
        Delta(
            plain,
            variant,
            {
                col: compare(cells[(plain, col)], cells[(variant, col)], n_boot, rng)
                for col in ordered_columns
                if (plain, col) in cells and (variant, col) in cells
            },
        )
        for plain, variant in unique_pairs
    ]
    table = Table(ordered_columns, rows, cells, deltas, view=view, warnings=warnings)
    table.tied = ties_with_best(table, n_boot, rng)
    scores = [[cells[(r.key, c)].mean if (r.key, c) in cells else None for c in ordered_columns] for r in rows]
    table.ranks = {r.key: rank for r, rank in zip(rows, stats.average_ranks(scores))}
    table.above_random, table.below_random = versus_random(table, n_boot, rng)
    return table


def with_published(table: Table, numbers: Iterable[Published]) -> Table:
    """The table with a row per published method, its numbers in the columns of their task and
    metric (every config of the task); such rows take no part in ties, ranks or Δs."""
    by_method: dict[str, list[Published]] = {}
    for number in numbers:
        by_method.setdefault(number.method, []).append(number)
    rows = list(table.rows)
    cells = dict(table.cells)
    for method, found in by_method.items():
        placed = [(col, n) for n in found for col in table.columns if (col.task, col.metric) == (n.task, n.metric)]
        if not placed:
            continue
        sources = sorted({n.source + (f" ({n.protocol})" if n.protocol else "") for n in found})
        row = Row(f"published:{method}", f"{method} (published)", [], {"source": "; ".join(sources)})
        rows.append(row)
        for col, number in placed:
            cells[(row.key, col)] = Estimate(float(number.value), method="published")
    return replace(table, rows=rows, cells=cells)


def reference_row(table: Table, row: Row, kind: str) -> Row | None:
    """The ``kind`` (random / supervised) row of ``row``'s architecture and stem, if the table has one."""
    found = [r for r in table.rows if r.reference == kind and r.family_key == row.family_key]
    return found[0] if len(found) == 1 else None


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


GAP_UNIT = "% of the random→supervised gap"


def normalise(table: Table) -> Table:
    """Each cell as the share of the gap from its random row to its supervised row (same
    architecture and stem) that it closes: ``100 (x - random) / (supervised - random)``. Intervals
    and Δs are mapped by the same affine map, holding the two references fixed; cells without
    both references, or with no gap between them, are left out."""
    if not any(r.reference == RANDOM for r in table.rows) or not any(r.reference == SUPERVISED for r in table.rows):
        raise ValueError("normalising needs a random and a supervised row (method random / supervised)")
    columns = {col: replace(col, unit=GAP_UNIT) for col in table.columns}
    scale: dict[tuple[str, Column], tuple[float, float]] = {}  # (row, column) -> (random value, gap)
    for row in table.rows:
        low, high = reference_row(table, row, RANDOM), reference_row(table, row, SUPERVISED)
        if low is None or high is None:
            continue
        for col in table.columns:
            if (low.key, col) in table.cells and (high.key, col) in table.cells:
                r, s = table.cells[(low.key, col)].mean, table.cells[(high.key, col)].mean
                if s != r:
                    scale[(row.key, col)] = (r, s - r)

    def share(value: float | None, origin: float, gap: float) -> float | None:
        return None if value is None else 100.0 * (value - origin) / gap

    cells = {}
    for (key, col), cell in table.cells.items():
        if (key, col) not in scale:
            continue
        r, gap = scale[(key, col)]
        lo, hi = share(cell.lo, r, gap), share(cell.hi, r, gap)
        if lo is not None and hi is not None and lo > hi:
            lo, hi = hi, lo
        by_seed = (
            {seed: replace(e, mean=100.0 * (e.mean - r) / gap, samples=None) for seed, e in cell.by_seed.items()}
            if cell.by_seed is not None
            else None
        )
        cells[(key, columns[col])] = replace(
            cell,
            mean=100.0 * (cell.mean - r) / gap,
            lo=lo,
            hi=hi,
            sd=None if cell.sd is None else 100.0 * cell.sd / abs(gap),
            samples=None if cell.samples is None else [100.0 * (v - r) / gap for v in cell.samples],
            by_seed=by_seed,
        )
    deltas = []
    for delta in table.deltas:
        mapped = {}
        for col, d in delta.cells.items():
            if (delta.variant, col) in scale:
                gap = scale[(delta.variant, col)][1]
                lo, hi = share(d.lo, 0.0, gap), share(d.hi, 0.0, gap)
                if lo is not None and hi is not None and lo > hi:
                    lo, hi = hi, lo
                mapped[columns[col]] = replace(d, diff=100.0 * d.diff / gap, lo=lo, hi=hi)
        deltas.append(Delta(delta.plain, delta.variant, mapped))
    used = [columns[c] for c in table.columns]
    return replace(
        table,
        columns=used,
        cells=cells,
        deltas=deltas,
        tied={(k, columns[c]) for k, c in table.tied if (k, c) in scale},
        above_random={(k, columns[c]) for k, c in table.above_random if (k, c) in scale},
        below_random={(k, columns[c]) for k, c in table.below_random if (k, c) in scale},
        normalised=True,
    )


def make_cell(rec: Mapping[str, Any], metric: str) -> Estimate:
    """One card's value of ``metric`` (percentage points) with its interval and paired samples."""
    mean = float(rec["metrics"][metric])
    extra = rec.get("extra") or {}
    ci: Any = (rec.get("ci95") or {}).get(metric)
    reported = (mean - float(ci), mean + float(ci)) if _finite(ci) else None
    per_episode = episode_samples(extra, metric)
    if per_episode:
        interval, method = (reported, "normal") if reported else stats.mean_interval(per_episode)
        return Estimate(mean, *_bounds(interval), len(per_episode), EPISODES, method, samples=per_episode)
    per_seed = [float(s[metric]) for s in extra.get("per_seed") or [] if _finite(s.get(metric))]
    if per_seed:
        sd = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None
        interval, method = stats.mean_interval(per_seed)
        return Estimate(mean, *_bounds(interval), len(per_seed), FT_SEEDS, method, sd=sd, samples=per_seed)
    return Estimate(mean, *_bounds(reported), method="reported" if reported else "")


def _bounds(interval: tuple[float, float] | None) -> tuple[float | None, float | None]:
    return interval if interval is not None else (None, None)


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
    lo, hi = _bounds(interval)
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


def compare(
    plain: Estimate, variant: Estimate, n_boot: int = 10_000, rng: np.random.Generator | None = None
) -> DeltaCell:
    """``variant - plain`` with the interval the data support (see the module's docstring)."""
    rng = rng or np.random.default_rng(0)
    if plain.by_seed is not None or variant.by_seed is not None:
        a = plain.by_seed if plain.by_seed is not None else {plain.seed: plain}
        b = variant.by_seed if variant.by_seed is not None else {variant.seed: variant}
        shared = [s for s in b if s in a and s is not None]
        if len(shared) == 1:
            return compare(a[shared[0]], b[shared[0]], n_boot, rng)
        if len(shared) >= 2:
            per_seed = [b[s].mean - a[s].mean for s in shared]
            diff = float(np.mean(per_seed))
            if len(shared) <= stats.SMALL_N:
                lo, hi = _bounds(stats.t_interval(per_seed))
                return DeltaCell(diff, lo, hi, len(shared), PT_SEEDS, "t")
            inner = [_paired(a[s], b[s]) for s in shared]
            groups = [d if d is not None else [b[s].mean - a[s].mean] for d, s in zip(inner, shared)]
            lo, hi = stats.two_level_bootstrap_ci(groups, n_boot, rng)
            return DeltaCell(diff, lo, hi, len(shared), PT_SEEDS, "two-level bootstrap")
        if plain.by_seed is not None and variant.by_seed is not None:  # no seed in common: unpaired
            interval = stats.welch_interval([e.mean for e in b.values()], [e.mean for e in a.values()])
            lo, hi = _bounds(interval)
            return DeltaCell(variant.mean - plain.mean, lo, hi, min(len(a), len(b)), PT_SEEDS, "welch")
        return DeltaCell(variant.mean - plain.mean)
    diff = variant.mean - plain.mean
    d = _paired(plain, variant)
    if d is None:
        return DeltaCell(diff, n=1 if plain.n == 1 and variant.n == 1 else None, over=plain.over)
    interval, method = stats.mean_interval(d, n_boot, rng)
    lo, hi = _bounds(interval)
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
    (the best included). An entry with no interval against the best cannot be shown to be below it."""
    tied = set()
    for col in table.columns:
        present = [(r.key, table.cells[(r.key, col)]) for r in table.rows if (r.key, col) in table.cells]
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
    for over in (FT_SEEDS, EPISODES):
        if unit_vars.get(over):
            out[over] = (math.sqrt(float(np.mean(unit_vars[over]))), f"{len(unit_vars[over])} paired card(s)")
    return out


def find_pairs(rows: Sequence[Row], same_seed: bool = False) -> list[tuple[str, str]]:
    """``(plain, variant)`` row keys from card metadata: a row trained with one of ``VARIANT_LOSSES``
    and the first row with the same ``TWIN_KEYS`` (and, for cards, the same pretraining seed) trained
    with a plain loss (never another variant: HCL is compared with NT-Xent, not with DCL)."""
    keys = (*TWIN_KEYS, "seed") if same_seed else TWIN_KEYS
    pairs = []
    for variant in rows:
        if variant.meta.get("loss") not in VARIANT_LOSSES:
            continue
        for plain in rows:
            if plain.meta.get("loss") in PLAIN_LOSSES and all(plain.meta.get(k) == variant.meta.get(k) for k in keys):
                pairs.append((plain.key, variant.key))
                break
    return pairs


def recipe_key(meta: Mapping[str, Any], sha256: str) -> str:
    """Cards whose pretraining configs differ only in ``train.seed`` share this key; a card whose
    config is unknown (a foreign checkpoint, a record from before configs were recorded, an empty
    config) is a recipe of its own."""
    config = meta.get("config")
    if not isinstance(config, Mapping) or not config:
        return "card:" + sha256
    train = dict(config.get("train") or {})
    train.pop("seed", None)
    blob = json.dumps({**config, "train": train}, sort_keys=True, default=str)
    return "recipe:" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def _card_key(rec: Mapping[str, Any]) -> str:
    return str(rec.get("backbone_sha256") or "name:" + str(rec["backbone"]))


def _cards(records: Iterable[Mapping[str, Any]], latest: bool, warnings: list[str]) -> dict[str, Card]:
    """The cards the records were made from, by SHA-256; ``name@sha8`` where names collide."""
    found: dict[str, Card] = {}
    for rec in records:
        sha = _card_key(rec)
        meta = dict(rec.get("backbone_meta") or {})
        created = str(meta.get("created") or rec.get("created") or "")
        card = found.get(sha)
        if card is None:
            found[sha] = Card(sha, str(rec["backbone"]), meta.get("seed"), meta, created)
        elif created > card.created and not meta.get("created"):
            card.created = created  # no card time: the newest record stands in for it
    by_name: dict[str, list[Card]] = {}
    for card in found.values():
        by_name.setdefault(card.name, []).append(card)
    for name, same in by_name.items():
        if len(same) < 2:
            continue
        if latest:
            keep = max(same, key=lambda c: c.created)
            for card in same:
                if card is not keep:
                    del found[card.sha256]
            continue
        warnings.append(
            f"{len(same)} different cards are named {name!r}; shown as name@sha8 (--latest keeps the newest)"
        )
        for card in same:
            card.name = f"{name}@{card.sha256[:8]}"
    return found


def _card_rows(cards: Mapping[str, Card]) -> list[Row]:
    return sorted((Row(c.sha256, c.name, [c], dict(c.meta)) for c in cards.values()), key=lambda r: r.name)


def _recipe_rows(cards: Mapping[str, Card], warnings: list[str]) -> list[Row]:
    """One row per recipe; a recipe of one card is that card's row."""
    groups: dict[str, list[Card]] = {}
    for card in cards.values():
        groups.setdefault(recipe_key(card.meta, card.sha256), []).append(card)
    rows = []
    for key, members in groups.items():
        if len(members) == 1:
            card = members[0]
            rows.append(Row(card.sha256, card.name, [card], dict(card.meta)))
            continue
        by_seed: dict[Any, Card] = {}
        for card in sorted(members, key=lambda c: c.created):
            if card.seed in by_seed:
                warnings.append(
                    f"cards {by_seed[card.seed].name!r} and {card.name!r} share recipe and seed {card.seed}; "
                    "the newer one counts"
                )
            by_seed[card.seed] = card
        members = sorted(by_seed.values(), key=lambda c: (str(c.seed), c.name))
        meta = {k: v for k, v in members[0].meta.items() if k not in ("seed", "created")}
        rows.append(Row(key, _recipe_name(members), members, meta))
    names: dict[str, int] = {}
    for row in rows:
        names[row.name] = names.get(row.name, 0) + 1
    for row in rows:
        if names[row.name] > 1 and row.is_recipe:
            row.name = f"{row.name}@{row.key.split(':')[1][:8]}"
    return sorted(rows, key=lambda r: r.name)


def _recipe_name(cards: Sequence[Card]) -> str:
    """The cards' common name without the seed suffix (``ring_moco_s0``, ``ring_moco_s1`` ->
    ``ring_moco``), else the first card's name and how many others."""
    bases = {re.sub(rf"[_-]s(eed)?{re.escape(str(c.seed))}$", "", c.name.split("@")[0]) for c in cards}
    if len(bases) == 1:
        return bases.pop()
    return f"{cards[0].name}+{len(cards) - 1}"


def _unit_warnings(records: Iterable[Mapping[str, Any]], columns: Sequence[Column]) -> list[str]:
    """Records read by the legacy rule whose values look like fractions beside others in percent."""
    out = []
    by_column: dict[tuple[str, str, str], list[tuple[str, float, str]]] = {}
    for rec in records:
        for metric, value in (rec.get("metrics") or {}).items():
            if _finite(value):
                key = (rec["task"], metric, rec.get("config_hash", ""))
                by_column.setdefault(key, []).append((str(rec["backbone"]), float(value), rec.get("units_from", "")))
    shown = {(c.task, c.metric, c.config_hash) for c in columns}
    for key, values in by_column.items():
        if key not in shown or not any(v > 1.5 for _, v, _ in values):
            continue
        for name, value, origin in values:
            if origin == "legacy rule" and 0 < value <= 1:
                out.append(
                    f"{name} {key[0]} {key[1]} = {value:g} is read as percent (its record declares no units) "
                    "beside values above 1: if it is a fraction, the record needs units: {metric: fraction}"
                )
    return out


def _config_labels(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], str]:
    """For tasks run with several configs: a short label of the settings that differ."""
    by_task: dict[str, dict[str, Mapping[str, Any]]] = {}
    for rec in records:
        by_task.setdefault(rec["task"], {})[rec.get("config_hash", "")] = rec.get("config") or {}
    labels = {}
    for task, configs in by_task.items():
        if len(configs) < 2:
            continue
        keys = sorted({k for c in configs.values() for k in c})
        differing = [k for k in keys if len({repr(c.get(k)) for c in configs.values()}) > 1]
        for cfg_hash, config in configs.items():
            parts = [f"{k}={_short(config.get(k))}" for k in differing]
            labels[(task, cfg_hash)] = ", ".join(parts) or f"config {cfg_hash[:8]}"
    return labels


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _column_order(col: Column) -> tuple:
    family = FAMILY_ORDER.index(col.family) if col.family in FAMILY_ORDER else len(FAMILY_ORDER)
    return (family, col.task, col.config_label, col.metric)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
