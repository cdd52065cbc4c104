"""Comparison tables from result records: cells, plain -> variant pairs, and paired significance.

Pure functions on lists of records (see ``transfer/results.py``); rendering lives in
``transfer/leaderboard.py``.

* A column is ``(task, metric, config)``: records of one task run with different configs are
  never merged, the column says which config.
* A cell is the newest record's value with its uncertainty: the 95% CI the task reported
  (episodes), else the standard deviation over seeds, else none.
* A Δ row compares a backbone trained with conditional negatives (the ring, HCL's hard negatives
  or DCL's debiased ones) with its plain twin (InfoNCE / NT-Xent): the difference of means and a paired
  bootstrap 95% interval, over the same episodes (few-shot: the same seed gives the same
  episodes) or over the same seeds (detection). Significant when the interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Families in the order the table shows them.
FAMILY_ORDER = ("detectron2", "fewshot", "linear")
# Losses that change which negatives count (ring: Wu et al. 2021; hcl: Robinson et al. 2021; dcl: Chuang
# et al. 2020), and the uniform-negative losses they are compared with.
VARIANT_LOSSES = ("ring", "hcl", "dcl")
PLAIN_LOSSES = ("nce", "ntxent")


@dataclass(frozen=True)
class Column:
    task: str
    metric: str
    config_hash: str
    config_label: str = ""  # the settings that differ from the task's other configs
    family: str = ""

    @property
    def label(self) -> str:
        base = f"{self.task} {self.metric}"
        return f"{base} [{self.config_label}]" if self.config_label else base


@dataclass
class Cell:
    mean: float
    err: float | None = None
    err_kind: str | None = None  # "ci95" | "std"
    samples: list[float] | None = None  # per-episode or per-seed values, for paired tests
    sample_kind: str | None = None  # "episodes" | "seeds"


@dataclass
class DeltaCell:
    diff: float
    lo: float | None = None
    hi: float | None = None
    test: str | None = None  # what the pairing was over; None when no paired samples exist

    @property
    def significant(self) -> bool:
        return self.lo is not None and self.hi is not None and (self.lo > 0 or self.hi < 0)


@dataclass
class Row:
    name: str
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Delta:
    plain: str
    variant: str
    cells: dict[Column, DeltaCell]


@dataclass
class Table:
    columns: list[Column]
    rows: list[Row]
    cells: dict[tuple[str, Column], Cell]
    deltas: list[Delta]

    def best(self, column: Column) -> float | None:
        values = [c.mean for (r, col), c in self.cells.items() if col == column and _finite(c.mean)]
        return max(values) if values else None


def build_table(
    records: Sequence[Mapping[str, Any]],
    tasks: Iterable[str] | None = None,
    headline: Mapping[str, Sequence[str]] | None = None,
    all_metrics: bool = False,
    pairs: Sequence[tuple[str, str]] = (),
    n_boot: int = 10_000,
    seed: int = 0,
) -> Table:
    """Rows = backbones, columns = (task, metric, config). ``headline[task]`` picks the metrics
    shown for a task (all of them when absent or ``all_metrics``); ``pairs`` adds explicit
    ``(plain, variant)`` Δ rows on top of those found from the cards' metadata."""
    wanted = set(tasks) if tasks else None
    newest: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    for rec in records:
        if wanted is not None and rec["task"] not in wanted:
            continue
        key = (row_name(rec), rec["task"], rec.get("config_hash", ""))
        if key not in newest or str(rec.get("created", "")) >= str(newest[key].get("created", "")):
            newest[key] = rec
    config_labels = _config_labels(newest.values())
    columns: dict[Column, None] = {}
    rows: dict[str, Row] = {}
    cells: dict[tuple[str, Column], Cell] = {}
    headline_metrics = headline or {}
    for (name, task, cfg), rec in newest.items():
        rows.setdefault(name, Row(name, rec.get("backbone_sha256", ""), dict(rec.get("backbone_meta") or {})))
        metrics = rec.get("metrics") or {}
        shown = (
            list(metrics)
            if all_metrics or not headline_metrics.get(task)
            else [m for m in headline_metrics[task] if m in metrics]
        )
        for metric in shown:
            column = Column(task, metric, cfg, config_labels.get((task, cfg), ""), rec.get("family", ""))
            columns[column] = None
            cells[(name, column)] = make_cell(rec, metric)
    ordered_columns = sorted(columns, key=_column_order)
    ordered_rows = sorted(rows.values(), key=lambda r: r.name)
    found = find_pairs(ordered_rows) + [p for p in pairs if p[0] in rows and p[1] in rows]
    unique_pairs = list(dict.fromkeys(found))
    rng = np.random.default_rng(seed)
    deltas = [
        Delta(
            plain,
            variant,
            {
                col: delta_cell(cells[(plain, col)], cells[(variant, col)], n_boot, rng)
                for col in ordered_columns
                if (plain, col) in cells and (variant, col) in cells
            },
        )
        for plain, variant in unique_pairs
    ]
    return Table(ordered_columns, ordered_rows, cells, deltas)


def row_name(rec: Mapping[str, Any]) -> str:
    return str(rec["backbone"])


def make_cell(rec: Mapping[str, Any], metric: str) -> Cell:
    """The value of ``metric`` with its uncertainty and paired samples, if the record has them."""
    mean = float(rec["metrics"][metric])
    extra = rec.get("extra") or {}
    per_episode = episode_samples(extra, metric, mean)
    per_seed = [s[metric] for s in extra.get("per_seed") or [] if metric in s]
    ci = (rec.get("ci95") or {}).get(metric)
    if per_episode:
        cell = Cell(mean, samples=[float(v) for v in per_episode], sample_kind="episodes")
    elif len(per_seed) > 1:
        cell = Cell(mean, samples=[float(v) for v in per_seed], sample_kind="seeds")
    else:
        cell = Cell(mean)
    if ci is not None:
        cell.err, cell.err_kind = float(ci), "ci95"
    elif len(per_seed) > 1:
        cell.err, cell.err_kind = float(np.std(per_seed, ddof=1)), "std"
    return cell


def episode_samples(extra: Mapping[str, Any], metric: str, mean: float) -> list[float] | None:
    """Per-episode values of ``metric``, on the metric's own scale.

    Few-shot records keep ``extra["episode_accuracies"][source]`` (fractions, in episode order);
    their metrics are ``acc`` (one source), ``acc_<source>`` and ``acc_avg`` (the mean over
    sources, paired episode by episode). ``extra["per_episode"][metric]`` is used as is.
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
    if len(values) == 0:
        return None
    scale = 100.0 if abs(values.mean() * 100 - mean) < abs(values.mean() - mean) else 1.0  # stored as fractions
    return (values * scale).tolist()


def find_pairs(rows: Sequence[Row]) -> list[tuple[str, str]]:
    """``(plain, variant)`` pairs from card metadata: a card trained with one of ``VARIANT_LOSSES``
    and the first card with the same method, dataset, arch and epochs trained with a plain loss
    (never another variant: HCL is compared with NT-Xent, not with DCL). A card may also name its
    twin in ``meta["pair"]``."""
    by_name = {r.name: r for r in rows}
    pairs = []
    for variant in rows:
        if variant.meta.get("loss") not in VARIANT_LOSSES:
            continue
        twin = variant.meta.get("pair")
        if twin in by_name:
            pairs.append((twin, variant.name))
            continue
        for plain in rows:
            if plain.meta.get("loss") not in PLAIN_LOSSES:
                continue
            if all(plain.meta.get(k) == variant.meta.get(k) for k in ("method", "dataset", "arch", "epochs")):
                pairs.append((plain.name, variant.name))
                break
    return pairs


def delta_cell(plain: Cell, variant: Cell, n_boot: int, rng: np.random.Generator) -> DeltaCell:
    diff = variant.mean - plain.mean
    if (
        plain.samples
        and variant.samples
        and plain.sample_kind == variant.sample_kind
        and len(plain.samples) == len(variant.samples)
        and len(plain.samples) > 1
    ):
        lo, hi = paired_bootstrap_ci(np.asarray(variant.samples) - np.asarray(plain.samples), n_boot, rng)
        return DeltaCell(diff, lo, hi, plain.sample_kind)
    return DeltaCell(diff)


def paired_bootstrap_ci(
    differences: np.ndarray, n_boot: int = 10_000, rng: np.random.Generator | None = None, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (resampling the pairs)."""
    rng = rng or np.random.default_rng(0)
    d = np.asarray(differences, dtype=np.float64)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    means = d[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


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
    return isinstance(value, (int, float)) and math.isfinite(value)
