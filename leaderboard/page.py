"""The HTML leaderboard: a self-contained page (inline CSS, figures as embedded PNGs, no script)
that reads at 1280 px without scrolling sideways.

One table per task family with a two-level header (task over metric) and the config differences
as footnotes; the rows' summary with their average rank; a forest plot of every Δ with its
interval and the zero line; a bar chart per family; the ring's schedule when it changes.
"""

from __future__ import annotations

import html
import string
from collections.abc import Sequence

from leaderboard.model import FAMILY_ORDER, Column, Table
from leaderboard.text import (
    MISSING,
    cell_value,
    delta_label,
    delta_value,
    flag_marks,
    fmt_rank,
    legend,
    n_text,
    nonfinite_text,
    random_mark,
    row_header,
    short,
    visible,
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.55em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } th.task { text-align: center; border-bottom: 1px solid #999; }
th:first-child, td:first-child { text-align: left; max-width: 16em; }
th, td, h1, h2, p, figcaption { overflow-wrap: anywhere; }
td .v { white-space: nowrap; } td .flag { color: #b00; font-weight: 700; }
td .n { display: block; color: #777; font-size: 0.8em; }
tr.delta td { color: #444; font-style: italic; } tr.published td { color: #555; background: #fbf8ee; }
td b { font-weight: 700; } table.rows td, table.rows th { text-align: left; }
.notes { color: #555; font-size: 0.82em; margin: 0.2em 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.82em; color: #555; }
"""


def render_page(table: Table, title: str = "ringbench leaderboard") -> str:
    from leaderboard.plots import family_bar_chart, forest_plot, ring_constant_notes, ring_schedule_chart

    parts = [f"<h1>{_e(title)}</h1>", _summary(table)]
    forest = forest_plot(table)
    if forest:
        parts.append("<h2>Δ: conditional negatives against their plain twin</h2>")
        parts.append(_figure("forest plot of every Δ with its 95% interval", forest))
    for family, columns in _families(table):
        groups, notes = _groups(columns)
        parts.append(f"<h2>{_e(family)} tasks</h2>")
        parts.append(_family_table(table, groups))
        parts += [f'<p class="notes">{_e(n)}</p>' for n in notes]
        labels = [f"{short(c.task)}{_mark(c, groups)}\n{short(c.metric)}" for c in columns]
        parts.append(_figure(f"{family} tasks", family_bar_chart(table, family, columns, labels)))
    parts.append("<h2>Notes</h2>")
    parts += [f'<p class="notes">{_e(n)}</p>' for n in [*legend(table), *ring_constant_notes(table)]]
    parts += [_figure(name, data) for name, data in ring_schedule_chart(table)]
    body = "\n".join(parts)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{_e(title)}</title><style>{STYLE}</style></head>
<body>
{body}
</body></html>
"""


def _e(text: str) -> str:
    """HTML text of ``text``: escaped, its control and bidirectional characters shown as escapes."""
    return html.escape(visible(text), quote=True)


def _figure(name: str, data: str) -> str:
    return (
        f'<figure><img alt="{_e(name)}" src="data:image/png;base64,{data}"/>'
        f"<figcaption>{_e(name)}</figcaption></figure>"
    )


def _families(table: Table) -> list[tuple[str, list[Column]]]:
    names = list(dict.fromkeys(c.family or "other" for c in table.columns))
    names.sort(key=lambda f: FAMILY_ORDER.index(f) if f in FAMILY_ORDER else len(FAMILY_ORDER))
    return [(f, [c for c in table.columns if (c.family or "other") == f]) for f in names]


Group = tuple[str, str, str, list[Column]]  # task, footnote mark, config label, its columns


def _groups(columns: Sequence[Column]) -> tuple[list[Group], list[str]]:
    """Columns grouped by (task, config) for the header's first level; a footnote per config label."""
    groups: dict[tuple[str, str], list[Column]] = {}
    for col in columns:
        groups.setdefault((col.task, col.config_label), []).append(col)
    out: list[Group] = []
    notes = []
    letters = iter(string.ascii_lowercase)
    for (task, label), cols in groups.items():
        mark = next(letters, "*") if label else ""
        if label:
            notes.append(f"{mark}: {task} run with {label}")
        out.append((task, mark, label, cols))
    return out, notes


def _mark(col: Column, groups: Sequence[Group]) -> str:
    return next(
        (f"[{mark}]" for task, mark, label, _ in groups if (task, label) == (col.task, col.config_label) and mark), ""
    )


def _family_table(table: Table, groups: Sequence[Group]) -> str:
    columns = [c for _, _, _, cols in groups for c in cols]
    top = [f'<th rowspan="2">{_e(row_header(table))}</th>']
    for task, mark, _, cols in groups:
        sup = f"<sup>{_e(mark)}</sup>" if mark else ""
        top.append(f'<th class="task" colspan="{len(cols)}">{_e(task)}{sup}</th>')
    second = [f"<th>{_e(c.metric)}{'' if c.unit == columns[0].unit else ' (' + _e(c.unit) + ')'}</th>" for c in columns]
    lines = ["<table>", "<thead>", "<tr>" + "".join(top) + "</tr>", "<tr>" + "".join(second) + "</tr>", "</thead>"]
    lines.append("<tbody>")
    deltas_after: dict[str, list] = {}
    for d in table.deltas:
        deltas_after.setdefault(d.variant, []).append(d)
    for row in table.rows:
        if not any((row.key, c) in table.cells or (row.key, c) in table.nonfinite for c in columns):
            continue
        css = ' class="published"' if row.published else ""
        cells = "".join(f"<td>{_cell(table, row.key, c)}</td>" for c in columns)
        lines.append(f"<tr{css}><td>{_e(row.name)}</td>{cells}</tr>")
        for delta in deltas_after.get(row.key, []):
            if not any(c in delta.cells for c in columns):
                continue
            dcells = "".join(f"<td>{_delta(delta.cells.get(c))}</td>" for c in columns)
            lines.append(f'<tr class="delta"><td>{_e(delta_label(table, delta))}</td>{dcells}</tr>')
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


def _cell(table: Table, key: str, col: Column) -> str:
    cell = table.cells.get((key, col))
    if cell is None and (key, col) in table.nonfinite:
        return f'<span class="v flag">{_e(nonfinite_text(table.nonfinite[(key, col)]))}</span>'
    if cell is None:
        return MISSING
    value = _e(cell_value(cell) + random_mark(table, key, col) + flag_marks(table, key, col))
    value = f"<b>{value}</b>" if (key, col) in table.tied else value
    n = n_text(cell.n, cell.over)
    return f'<span class="v">{value}</span>' + (f'<span class="n">{_e(n)}</span>' if n else "")


def _delta(delta) -> str:
    if delta is None:
        return MISSING
    n = n_text(delta.n, delta.over)
    return f'<span class="v">{_e(delta_value(delta))}</span>' + (f'<span class="n">{_e(n)}</span>' if n else "")


def _summary(table: Table) -> str:
    """The rows: what each is (method, loss, cards and seeds) and its average rank over all columns."""
    lines = [
        '<table class="rows">',
        f"<thead><tr><th>{_e(row_header(table))}</th><th>method</th><th>loss</th><th>cards</th>"
        f"<th>pretraining seeds</th><th>avg rank</th></tr></thead>",
        "<tbody>",
    ]
    for row in table.rows:
        if row.published:
            continue
        seeds = ", ".join(str(c.seed) for c in row.cards if c.seed is not None) or MISSING
        rank = fmt_rank(table.ranks.get(row.key, (None, 0)), table.ranked)
        lines.append(
            f"<tr><td>{_e(row.name)}</td><td>{_e(str(row.meta.get('method', MISSING)))}</td>"
            f"<td>{_e(str(row.meta.get('loss', MISSING)))}</td><td>{len(row.cards)}</td>"
            f"<td>{_e(seeds)}</td><td>{_e(rank)}</td></tr>"
        )
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)
