"""Figures for the HTML leaderboard, returned as base64 PNGs so the page is self-contained."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

from leaderboard.model import Column, Estimate, Table
from leaderboard.text import short


def _matplotlib() -> Any:
    """matplotlib without a display, and without mathtext: a ``$`` in a name is text, not a formula."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def family_bar_chart(table: Table, family: str, columns: list[Column], labels: list[str]) -> str:
    """A grouped bar chart of one task family: a group per column (``labels``), a bar per row that
    was run here, error bars as the table's (half the 95% interval; a recipe's sd), the legend beside
    the axes so it covers no bar."""
    import numpy as np

    plt = _matplotlib()
    rows = [r for r in table.rows if not r.published]
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(min(9.0, max(4.0, 0.9 * len(columns) + 2.0)), 3.0))
    x = np.arange(len(columns))
    for i, row in enumerate(rows):
        cells = [table.cells.get((row.key, c)) for c in columns]
        means = [c.mean if c else np.nan for c in cells]
        errs = [_error_bar(c) for c in cells]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, yerr=errs, capsize=2, label=short(row.name))
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel(columns[0].unit if len({c.unit for c in columns}) == 1 else "value")
    ax.set_title(f"{family} tasks", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _png(fig)


def forest_plot(table: Table) -> str | None:
    """Every Δ row's difference with its 95% interval, one line per (pair, column), and the zero
    line: the figure that answers "does the variant transfer better than its plain twin?". Filled
    markers are significant; hollow ones have an interval that covers 0; crosses have no interval."""
    items = [
        (d, col, cell)
        for d in table.deltas
        for col in table.columns
        if (cell := d.cells.get(col)) is not None and not cell.refused
    ]
    if not items:
        return None
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(7.5, 0.6 + 0.28 * len(items)))
    labels = []
    for y, (delta, col, cell) in enumerate(reversed(items)):
        labels.append(
            f"{short(table.row(delta.variant).name)} − {short(table.row(delta.plain).name)} · {short(col.label)}"
        )
        if cell.lo is not None and cell.hi is not None:
            ax.plot([cell.lo, cell.hi], [y, y], color="#333", linewidth=1.2)
            face = "#1f77b4" if cell.significant else "white"
            ax.plot([cell.diff], [y], "o", markerfacecolor=face, markeredgecolor="#1f77b4", markersize=6)
        else:
            ax.plot([cell.diff], [y], "x", color="#888", markersize=6)
    ax.axvline(0.0, color="#c00", linewidth=1, linestyle="--")
    ax.set_yticks(range(len(items)), labels, fontsize=7)
    ax.set_xlabel("Δ variant − plain (" + ("% of gap" if table.normalised else "points") + "), 95% interval")
    ax.set_title("Δ: conditional negatives against their plain twin", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _error_bar(cell: Estimate | None) -> float:
    """Half the 95% interval of a card's cell, the sd of a recipe's (as the table shows them)."""
    if cell is None:
        return 0.0
    if cell.by_seed is not None and cell.sd is not None:
        return cell.sd
    return (cell.hi - cell.lo) / 2 if cell.lo is not None and cell.hi is not None else 0.0


def ring_curves(table: Table) -> dict[str, tuple[list[int], list[float]]]:
    """Each ring row's share of the negatives kept, epoch by epoch."""
    found = {r.name: schedule_curve(r.meta) for r in table.rows if r.meta.get("loss") == "ring"}
    return {name: curve for name, curve in found.items() if curve}


def ring_schedule_chart(table: Table) -> list[tuple[str, str]]:
    """The share of the negatives the ring keeps, ``w_outer * (1 - w_inner)``, over pretraining
    epochs, one line per ring row (the ring is ranks ``[floor(w_inner * outer), outer)`` of the
    negatives sorted by similarity, ``outer = floor(w_outer * K)``). None when every ring keeps a
    constant share: a flat line says nothing a sentence cannot (``ring_constant_notes``)."""
    curves = ring_curves(table)
    if not curves or all(len(set(values)) == 1 for _, values in curves.values()):
        return []
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(4.5, 3.0))
    for name, (epochs, values) in curves.items():
        ax.plot(epochs, values, label=short(name))
    ax.set_xlabel("epoch")
    ax.set_ylabel("share of negatives in the ring, w_outer·(1−w_inner)")
    ax.set_ylim(0, 1.05)
    ax.set_title("ring threshold schedule", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return [("ring threshold schedule", _png(fig))]


def ring_constant_notes(table: Table) -> list[str]:
    """A sentence per ring row whose kept share never changes."""
    return [
        f"{name} keeps {100 * values[0]:.1f}% of the negatives (w_outer·(1−w_inner)) in all {len(values) - 1} epochs."
        for name, (_, values) in ring_curves(table).items()
        if len(set(values)) == 1
    ]


def schedule_curve(meta: Mapping[str, Any]) -> tuple[list[int], list[float]] | None:
    """``(epochs, w_outer * (1 - w_inner))`` from a card's loss parameters, through the pretraining schedule."""
    params = dict(meta.get("loss_params") or {})
    epochs = int(meta.get("epochs") or 0)
    if epochs < 1 or "w_outer" not in params:
        return None
    from ringbench.ring_schedules import ring_threshold

    names = ("schedule", "w_outer_start", "w_outer", "anneal_epochs")
    kwargs = {k: params[k] for k in names if k in params}
    if "schedule_steps" in params:
        kwargs["steps"] = params["schedule_steps"]
    kwargs.setdefault("schedule", "constant")
    points = list(range(epochs + 1))
    keep_inner = 1.0 - float(params.get("w_inner", 0.0))
    return points, [float(ring_threshold(e, **kwargs)) * keep_inner for e in points]
