"""Figures for the HTML leaderboard, returned as base64 PNGs so the page is self-contained."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

from transfer.compare import Estimate, Table


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


def family_bar_charts(table: Table) -> list[tuple[str, str]]:
    """One grouped bar chart per task family: a group per column, a bar per backbone, error bars."""
    import numpy as np

    plt = _matplotlib()

    charts = []
    families = list(dict.fromkeys(c.family or "other" for c in table.columns))
    for family in families:
        columns = [c for c in table.columns if (c.family or "other") == family]
        width = 0.8 / max(1, len(table.rows))
        fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(columns) + 1.5), 3.2))
        x = np.arange(len(columns))
        for i, row in enumerate(table.rows):
            cells = [table.cells.get((row.key, c)) for c in columns]
            means = [c.mean if c else np.nan for c in cells]
            errs = [_error_bar(c) for c in cells]
            ax.bar(x + (i - (len(table.rows) - 1) / 2) * width, means, width, yerr=errs, capsize=2, label=row.name)
        ax.set_xticks(x, [c.label for c in columns], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{family} tasks")
        ax.legend(fontsize=7)
        charts.append((f"{family} tasks", _png(fig)))
    return charts


def _error_bar(cell: Estimate | None) -> float:
    """Half the 95% interval of a card's cell, the sd of a recipe's (as the table shows them)."""
    if cell is None:
        return 0.0
    if cell.by_seed is not None and cell.sd is not None:
        return cell.sd
    return (cell.hi - cell.lo) / 2 if cell.lo is not None and cell.hi is not None else 0.0


def ring_schedule_chart(table: Table) -> list[tuple[str, str]]:
    """The share of the negatives the ring keeps, ``w_outer * (1 - w_inner)``, over pretraining
    epochs, one line per ring row (the ring is ranks ``[floor(w_inner * outer), outer)`` of the
    negatives sorted by similarity, ``outer = floor(w_outer * K)``)."""
    all_curves = {r.name: schedule_curve(r.meta) for r in table.rows if r.meta.get("loss") == "ring"}
    curves = {k: v for k, v in all_curves.items() if v}
    if not curves:
        return []
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(4.5, 3.0))
    for name, (epochs, values) in curves.items():
        ax.plot(epochs, values, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("share of negatives in the ring, w_outer·(1−w_inner)")
    ax.set_ylim(0, 1.05)
    ax.set_title("ring threshold schedule")
    ax.legend(fontsize=7)
    return [("ring threshold schedule", _png(fig))]


def schedule_curve(meta: Mapping[str, Any]) -> tuple[list[int], list[float]] | None:
    """``(epochs, w_outer * (1 - w_inner))`` from a card's loss parameters, through the pretraining schedule."""
    params = dict(meta.get("loss_params") or {})
    epochs = int(meta.get("epochs") or 0)
    if epochs < 1 or "w_outer" not in params:
        return None
    from pretrain.losses import ring_threshold

    names = ("schedule", "w_outer_start", "w_outer", "anneal_epochs")
    kwargs = {k: params[k] for k in names if k in params}
    if "schedule_steps" in params:
        kwargs["steps"] = params["schedule_steps"]
    kwargs.setdefault("schedule", "constant")
    points = list(range(epochs + 1))
    keep_inner = 1.0 - float(params.get("w_inner", 0.0))
    return points, [float(ring_threshold(e, **kwargs)) * keep_inner for e in points]
