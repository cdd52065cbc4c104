"""Figures for the HTML leaderboard, returned as base64 PNGs so the page is self-contained."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any

from transfer.compare import Table


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def family_bar_charts(table: Table) -> list[tuple[str, str]]:
    """One grouped bar chart per task family: a group per column, a bar per backbone, error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    charts = []
    families = list(dict.fromkeys(c.family or "other" for c in table.columns))
    for family in families:
        columns = [c for c in table.columns if (c.family or "other") == family]
        names = [r.name for r in table.rows]
        width = 0.8 / max(1, len(names))
        fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(columns) + 1.5), 3.2))
        x = np.arange(len(columns))
        for i, name in enumerate(names):
            cells = [table.cells.get((name, c)) for c in columns]
            means = [c.mean if c else np.nan for c in cells]
            errs = [c.err if c and c.err is not None else 0.0 for c in cells]
            ax.bar(x + (i - (len(names) - 1) / 2) * width, means, width, yerr=errs, capsize=2, label=name)
        ax.set_xticks(x, [c.label for c in columns], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{family} tasks")
        ax.legend(fontsize=7)
        charts.append((f"{family} tasks", _png(fig)))
    return charts


def ring_schedule_chart(table: Table) -> list[tuple[str, str]]:
    """The ring's outer threshold w_outer over pretraining epochs, one line per ring backbone."""
    all_curves = {r.name: schedule_curve(r.meta) for r in table.rows if r.meta.get("loss") == "ring"}
    curves = {k: v for k, v in all_curves.items() if v}
    if not curves:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.0))
    for name, (epochs, values) in curves.items():
        ax.plot(epochs, values, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("w_outer (fraction of negatives in the ring)")
    ax.set_ylim(0, 1.05)
    ax.set_title("ring threshold schedule")
    ax.legend(fontsize=7)
    return [("ring threshold schedule", _png(fig))]


def schedule_curve(meta: Mapping[str, Any]) -> tuple[list[int], list[float]] | None:
    """``(epochs, w_outer)`` from a card's loss parameters, through the pretraining schedule."""
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
    return points, [float(ring_threshold(e, **kwargs)) for e in points]
