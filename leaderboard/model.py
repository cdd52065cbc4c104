"""The table's data model: columns, cells with their intervals, rows of cards or recipes, Δ rows.

* **A card is its SHA-256** (DESIGN, "Result records": a row of a table is a card, never a name).
  Two cards with one name are two rows, shown as ``name@sha8``.
* **A recipe** is the cards whose pretraining configs differ only in ``train.seed``: its row holds
  the mean over its cards, the standard deviation across pretraining seeds and their number.
* **A column** is ``(task, metric, config, unit)``: records of one task run with different configs
  are never merged. Every value is in percentage points (``ringbench.records.in_percent``).
* **Reference rows** (random initialisation, supervised, published numbers) frame a table and are
  compared with as a Δ row is (``leaderboard/deltas.py``).

Built by ``leaderboard/build.py``; shown by ``leaderboard/text.py``, ``page.py`` and ``plots.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ringbench.records import PERCENT

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

# A value in percentage points outside this range is implausible (a fraction read as percent x 100, a
# wrong unit or scale): flagged with a mark and a warning, shown as recorded.
PLAUSIBLE_PERCENT = (-100.0, 100.0)

# What an interval is over, as the tables abbreviate it.
EPISODES, FT_SEEDS, PT_SEEDS = "episodes", "fine-tuning seeds", "pretraining seeds"
TEST_IMAGES, LOWSHOT_SAMPLES = "test images", "low-shot samples"
# What a record may name as its samples (``extra["samples_over"]``); without it, per-episode values are over
# episodes and per-seed values over fine-tuning seeds, as every record before the field.
SAMPLES_OVER = (EPISODES, FT_SEEDS, TEST_IMAGES, LOWSHOT_SAMPLES)


@dataclass(frozen=True)
class Column:
    """One column: a task's metric under one config, in one unit (configs are never merged)."""

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
    """``variant - plain`` in one column, with its interval (``leaderboard/deltas.py``)."""

    diff: float
    lo: float | None = None
    hi: float | None = None
    n: int | None = None
    over: str = ""
    method: str = ""
    refused: str = ""  # why the Δ is not shown (its estimate lies outside its own interval); empty if shown

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (and rests on at least two replicates)."""
        return (
            not self.refused
            and self.lo is not None
            and self.hi is not None
            and (self.n or 0) >= 2
            and (self.lo > 0 or self.hi < 0)
        )


@dataclass
class Card:
    """A backbone card as the records name it: its SHA-256 is its identity."""

    sha256: str
    name: str  # as shown: the card's name, or name@sha8 when another card has that name
    seed: Any
    meta: dict[str, Any]
    created: str


@dataclass
class Row:
    """A card, a recipe (its cards over pretraining seeds), or a published method (no cards)."""

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
    """The Δ row of a (plain, variant) pair of rows."""

    plain: str  # row keys
    variant: str
    cells: dict[Column, DeltaCell]


@dataclass
class Table:
    """Everything a renderer shows: rows x columns of cells, Δ rows, marks, ranks and warnings."""

    columns: list[Column]
    rows: list[Row]
    cells: dict[tuple[str, Column], Estimate]
    deltas: list[Delta]
    view: str = "recipes"
    tied: set[tuple[str, Column]] = field(default_factory=set)  # not significantly below the best
    ranks: dict[str, tuple[float | None, int]] = field(default_factory=dict)
    ranked: int = 0  # the columns an average rank is over (all but aggregates whose parts are shown)
    warnings: list[str] = field(default_factory=list)
    above_random: set[tuple[str, Column]] = field(default_factory=set)  # significantly above the random row
    below_random: set[tuple[str, Column]] = field(default_factory=set)  # significantly below it
    normalised: bool = False  # cells are shares of the random -> supervised gap
    # (row, column) -> the NaN / infinite values of its cards there ("nan", "inf"): shown, never as not run, and
    # left out of the cells, so of bests, ranks, Δs and recipe means
    nonfinite: dict[tuple[str, Column], list[str]] = field(default_factory=dict)
    implausible: set[tuple[str, Column]] = field(default_factory=set)  # a percentage outside PLAUSIBLE_PERCENT

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)

    def row_by_name(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.name == name), None)

    def best(self, column: Column) -> float | None:
        """The column's best value; never a non-finite or an implausible one."""
        values = [
            c.mean
            for (key, col), c in self.cells.items()
            if col == column and is_finite(c.mean) and (key, col) not in self.implausible
        ]
        return max(values) if values else None

    def methods(self) -> list[str]:
        """How the intervals shown were made, for the note under the table."""
        found = {(c.over, c.method) for c in self.cells.values() if c.has_interval}
        found |= {(d.over, d.method) for delta in self.deltas for d in delta.cells.values() if d.lo is not None}
        return [describe(over, method) for over, method in sorted(found)]


def describe(over: str, method: str) -> str:
    """An interval's method in words, for the note under a table."""
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


def reference_row(table: Table, row: Row, kind: str) -> Row | None:
    """The ``kind`` (random / supervised) row of ``row``'s architecture and stem, if the table has one."""
    found = [r for r in table.rows if r.reference == kind and r.family_key == row.family_key]
    return found[0] if len(found) == 1 else None


def bounds(interval: tuple[float, float] | None) -> tuple[float | None, float | None]:
    """``(lo, hi)`` of an interval, ``(None, None)`` when the data give none."""
    return interval if interval is not None else (None, None)


def is_finite(value: Any) -> bool:
    """A real number that is neither NaN nor infinite (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
