"""Records -> a table: rows of recipes (``view="recipes"``) or cards (``"cards"``), columns of
(task, metric, config, unit), cells, Δ rows for each plain -> variant pair, ties, ranks and marks.

Pure functions on lists of records (``ringbench/store.py``), which describe themselves: the metrics
shown are each record's ``headline`` (``store.record_headline``), values are in percent by
``store.in_percent``. The rules of the cells are in ``leaderboard/cells.py``, those of the Δs and
marks in ``leaderboard/deltas.py``; published numbers (``ringbench/published.py``) join as rows
without cards.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from leaderboard.cells import make_cell, row_cell
from leaderboard.deltas import compare, ties_with_best, versus_random
from leaderboard.model import (
    FAMILY_ORDER,
    PLAIN_LOSSES,
    PLAUSIBLE_PERCENT,
    REFERENCE_METHODS,
    TWIN_KEYS,
    VARIANT_LOSSES,
    Card,
    Column,
    Delta,
    Estimate,
    Row,
    Table,
    is_finite,
)
from ringbench import stats
from ringbench.published import Published
from ringbench.records import PERCENT, created_time, in_percent, preference, record_headline


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

    What could mislead is shown and said (``Table.warnings``): a NaN or infinite value is kept out of
    the cells (so of bests, ranks, Δs and recipe means) and shown as such (``Table.nonfinite``), never as
    not run, and a record with one never displaces a finite record of its identity, nor a card with
    finite values its name under ``latest``; a percentage outside ``PLAUSIBLE_PERCENT`` is marked
    (``Table.implausible``); a Δ whose estimate is outside its own interval is refused (``deltas.compare``).
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
        if key not in newest or preference(rec) >= preference(newest[key]):  # finite first, then newest
            newest[key] = rec
    warnings: list[str] = []
    cards = _cards(newest.values(), latest, warnings)
    chosen = {key: rec for key, rec in newest.items() if key[0] in cards}
    config_labels = _config_labels(chosen.values())
    columns: dict[Column, None] = {}
    card_cells: dict[tuple[str, Column], Estimate] = {}
    card_nonfinite: dict[tuple[str, Column], str] = {}
    card_implausible: set[tuple[str, Column]] = set()
    headline_order: dict[str, dict[str, int]] = {}  # task -> its metrics in the order its records name them
    parts_of: dict[tuple[str, str, str], list[str]] = {}  # (task, config, aggregate metric) -> the metrics it sums up
    for (sha, task, cfg), rec in chosen.items():
        metrics = rec.get("metrics") or {}
        for metric, parts in record_aggregates(rec).items():
            parts_of.setdefault((task, cfg, metric), parts)
        headline_order.setdefault(task, {m: i for i, m in enumerate(record_headline(rec))})
        for metric in list(metrics) if all_metrics else record_headline(rec):
            value = metrics.get(metric)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            unit = str((rec.get("units") or {}).get(metric, PERCENT))
            column = Column(task, metric, cfg, config_labels.get((task, cfg), ""), rec.get("family", ""), unit)
            columns[column] = None
            name = cards[sha].name
            if not is_finite(value):
                card_nonfinite[(sha, column)] = _value_word(value)
                warnings.append(
                    f"{name} {task} {metric} = {value}: not a finite number (a failed or diverged run?); shown as "
                    f"{_value_word(value)}!, left out of bests, ranks, Δs and recipe means"
                )
                continue
            cell = make_cell(rec, metric)
            card_cells[(sha, column)] = cell
            if unit == PERCENT and not PLAUSIBLE_PERCENT[0] <= value <= PLAUSIBLE_PERCENT[1]:
                card_implausible.add((sha, column))
                warnings.append(
                    f"{name} {task} {metric} = {value:g}: implausible for a percentage (outside "
                    f"[{PLAUSIBLE_PERCENT[0]:g}, {PLAUSIBLE_PERCENT[1]:g}]; a wrong unit or scale?); marked ?"
                )
            if cell.has_interval and not cell.lo <= cell.mean <= cell.hi:  # type: ignore[operator]
                warnings.append(
                    f"{name} {task} {metric} = {cell.mean:.2f} lies outside its own 95% interval "
                    f"[{cell.lo:.2f}, {cell.hi:.2f}] ({cell.method} over {cell.over}): the metric disagrees with "
                    "its samples; Δs that pair them are refused"
                )
    ordered_columns = sorted(columns, key=lambda col: _column_order(col, headline_order.get(col.task, {})))
    warnings += _unit_warnings(chosen.values(), ordered_columns)
    rows = _card_rows(cards) if view == "cards" else _recipe_rows(cards, warnings)
    rows.sort(key=lambda r: (REFERENCE_METHODS.index(r.reference) if r.reference else len(REFERENCE_METHODS), r.name))
    cells: dict[tuple[str, Column], Estimate] = {}
    nonfinite: dict[tuple[str, Column], list[str]] = {}
    implausible: set[tuple[str, Column]] = set()
    for row in rows:
        for col in ordered_columns:
            estimate = row_cell(row, col, card_cells)
            if estimate is not None:
                cells[(row.key, col)] = estimate
            bad = [card_nonfinite[(c.sha256, col)] for c in row.cards if (c.sha256, col) in card_nonfinite]
            if bad:
                nonfinite[(row.key, col)] = bad
            if any((c.sha256, col) in card_implausible for c in row.cards):
                implausible.add((row.key, col))
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
    for delta in deltas:
        for col, d in delta.cells.items():
            if d.refused:
                warnings.append(
                    f"Δ {table_name(rows, delta.variant)} − {table_name(rows, delta.plain)} in {col.label} refused: "
                    f"{d.refused}"
                )
    table = Table(
        ordered_columns,
        rows,
        cells,
        deltas,
        view=view,
        warnings=warnings,
        nonfinite=nonfinite,
        implausible=implausible,
    )
    table.tied = ties_with_best(table, n_boot, rng)
    ranked = ranked_columns(ordered_columns, parts_of)
    scores = [  # an implausible value takes no rank (it would take the first)
        [cells[(r.key, c)].mean if (r.key, c) in cells and (r.key, c) not in implausible else None for c in ranked]
        for r in rows
    ]
    table.ranks = {r.key: rank for r, rank in zip(rows, stats.average_ranks(scores))}
    table.ranked = len(ranked)
    table.above_random, table.below_random = versus_random(table, n_boot, rng)
    return table


def record_aggregates(record: Mapping[str, Any]) -> dict[str, list[str]]:
    """The metrics of a record that sum up others (``extra.aggregates``: ``{"mean": ["cifar10/acc", ...]}``;
    ``extra.mean_over``, a list, of ``linear_kornblith`` records written before it), each with its parts.
    Anything malformed (the record is untrusted) declares nothing."""
    extra = record.get("extra")
    if not isinstance(extra, Mapping):
        return {}
    declared = extra.get("aggregates")
    if declared is None and isinstance(extra.get("mean_over"), list):
        declared = {"mean": extra["mean_over"]}
    if not isinstance(declared, Mapping):
        return {}
    return {
        str(metric): [str(p) for p in parts]
        for metric, parts in declared.items()
        if isinstance(parts, list) and all(isinstance(p, str) for p in parts)
    }


def ranked_columns(columns: Sequence[Column], parts_of: Mapping[tuple[str, str, str], list[str]]) -> list[Column]:
    """The columns an average rank counts: all but an aggregate (a battery's mean, Meta-Dataset's average)
    whose parts are columns too, which would count the same results twice."""
    shown = {(c.task, c.config_hash, c.metric) for c in columns}
    return [
        c
        for c in columns
        if not any((c.task, c.config_hash, p) in shown for p in parts_of.get((c.task, c.config_hash, c.metric), ()))
    ]


def table_name(rows: Sequence[Row], key: str) -> str:
    """The name of the row with this key."""
    return next(r.name for r in rows if r.key == key)


def _value_word(value: float) -> str:
    """``nan``, ``inf`` or ``-inf``: how a non-finite value is written in a table."""
    return "nan" if value != value else ("inf" if value > 0 else "-inf")


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
        measured = _rows_of_checkpoint(rows, {n.checkpoint for n in found if n.checkpoint})
        # beside the same checkpoint's measured row (whether the suite reproduces it, at a glance), else last
        rows.insert(rows.index(measured[-1]) + 1 if measured else len(rows), row)
        for col, number in placed:
            cells[(row.key, col)] = Estimate(float(number.value), method="published")
    return replace(table, rows=rows, cells=cells)


def _rows_of_checkpoint(rows: Sequence[Row], names: set[str]) -> list[Row]:
    """The measured rows of a published checkpoint (a zoo entry): loaded as ``zoo:NAME`` (the row's name) or
    converted from it into a card (``source_name`` in the card's meta)."""
    if not names:
        return []
    return [r for r in rows if r.cards and (r.name in names or r.meta.get("source_name") in names)]


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
    finite: set[str] = set()  # cards with at least one finite metric
    for rec in records:
        sha = _card_key(rec)
        if any(is_finite(v) for v in (rec.get("metrics") or {}).values()):
            finite.add(sha)
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
        if latest:  # the newest card that has a finite value: a card of only NaNs never displaces a real one
            keep = max(same, key=lambda c: (c.sha256 in finite, created_time({"created": c.created})))
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
            if is_finite(value):
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


def _column_order(col: Column, headline: Mapping[str, int]) -> tuple:
    """Families in their order, then tasks and configs; a task's metrics in its headline's order (a battery's
    mean first, then its data sets), the others after them by name."""
    family = FAMILY_ORDER.index(col.family) if col.family in FAMILY_ORDER else len(FAMILY_ORDER)
    return (family, col.task, col.config_label, headline.get(col.metric, len(headline)), col.metric)
