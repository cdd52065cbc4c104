"""Turn result records into comparison tables: Markdown, LaTeX, HTML or CSV.

    python transfer/leaderboard.py                          # Markdown to the terminal
    python transfer/leaderboard.py --format html --out results/leaderboard.html
    python transfer/leaderboard.py --tasks syn_det fewshot_digits --baseline moco=ring_moco
    python transfer/leaderboard.py --export-jsonl all.jsonl     # also: every record in one file, to share

One row per backbone, one column per (task, metric, config); cells are ``mean ± CI95`` (episodes)
or ``mean ± std`` (seeds); the best value of each column is marked; a missing cell is shown as
``—``, never as 0. Each plain -> variant pair (ring, HCL or DCL against the same method with
InfoNCE / NT-Xent) gets a Δ row with a paired bootstrap 95% interval;
``*`` marks a difference whose interval excludes 0.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringbench.cli import add_common_flags, run_main
from ringbench.errors import UserError
from transfer.compare import Cell, Column, Delta, DeltaCell, Table, build_table

MISSING = "—"
FORMATS = ("md", "latex", "html", "csv")


def _digits(reference: float) -> int:
    """Two decimals for AP-like numbers (0-100), three for fractions (accuracy in 0-1)."""
    return 2 if abs(reference) >= 1 else 3


def fmt_cell(cell: Cell | None) -> str:
    if cell is None:
        return MISSING
    d = _digits(cell.mean)
    text = f"{cell.mean:.{d}f}"
    if cell.err is not None:
        text += f" ± {cell.err:.{d}f}"
    return text


def fmt_delta(delta: DeltaCell | None, reference: float = 1.0) -> str:
    if delta is None:
        return MISSING
    d = _digits(reference)
    text = f"{delta.diff:+.{d}f}"
    if delta.lo is not None:
        text += f" [{delta.lo:+.{d}f}, {delta.hi:+.{d}f}]" + ("*" if delta.significant else "")
    return text


def table_rows(table: Table, mark_best: Callable[[str], str]) -> list[list[str]]:
    """Body rows as strings; ``mark_best(text)`` decorates the best cell of each column."""
    best = {col: table.best(col) for col in table.columns}
    rows = []
    deltas_after: dict[str, list[Delta]] = {d.variant: [] for d in table.deltas}
    for d in table.deltas:
        deltas_after[d.variant].append(d)
    for row in table.rows:
        cells = []
        for col in table.columns:
            cell = table.cells.get((row.name, col))
            text = fmt_cell(cell)
            cells.append(
                mark_best(text)
                if cell is not None and best[col] is not None and cell.mean == best[col] and _rows_with(table, col) > 1
                else text
            )
        rows.append([row.name, *cells])
        for delta in deltas_after.get(row.name, []):
            rows.append(
                [
                    f"Δ {delta.variant} − {delta.plain}",
                    *(fmt_delta(delta.cells.get(c), _reference(table, delta.plain, c)) for c in table.columns),
                ]
            )
    return rows


def _reference(table: Table, name: str, col: Column) -> float:
    cell = table.cells.get((name, col))
    return cell.mean if cell is not None else 1.0


def _rows_with(table: Table, col: Column) -> int:
    return sum(1 for (_, c) in table.cells if c == col)


def legend(table: Table) -> str:
    kinds = {c.err_kind for c in table.cells.values() if c.err_kind}
    spreads = {"ci95": "the 95% confidence interval over episodes", "std": "the standard deviation over seeds"}
    parts = ["± is " + " or ".join(spreads[k] for k in sorted(kinds))] if kinds else []
    parts.append("the best value of each column is marked")
    if table.deltas:
        parts.append("Δ rows: variant minus plain, [paired bootstrap 95% interval], * = significant")
    parts.append(f"{MISSING} = not run")
    return "; ".join(parts) + "."


def render_markdown(table: Table) -> str:
    from tabulate import tabulate

    headers = ["backbone", *(c.label for c in table.columns)]
    body = tabulate(table_rows(table, lambda t: f"**{t}**"), headers=headers, tablefmt="github", disable_numparse=True)
    return body + "\n\n" + legend(table) + "\n"


def render_latex(table: Table) -> str:
    def esc(text: str) -> str:
        for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
            text = text.replace(a, b)
        return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("−", "$-$").replace(MISSING, "--")

    rows = table_rows(table, lambda t: "\x00" + t + "\x01")
    lines = [
        r"\begin{tabular}{l" + "r" * len(table.columns) + "}",
        r"\toprule",
        " & ".join(esc(h) for h in ["backbone", *(c.label for c in table.columns)]) + r" \\",
        r"\midrule",
    ]
    for row in rows:
        cells = [esc(c).replace("\x00", r"\textbf{").replace("\x01", "}") for c in row]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", "% " + legend(table)]
    return "\n".join(lines) + "\n"


def render_csv(table: Table) -> str:
    """Numbers, not strings: one value and one uncertainty column per table column."""
    out = io.StringIO()
    writer = csv.writer(out)
    header = ["backbone"]
    for col in table.columns:
        header += [col.label, f"{col.label} ±"]
    writer.writerow(header)
    for row in table.rows:
        values: list[str | float] = [row.name]
        for col in table.columns:
            cell = table.cells.get((row.name, col))
            values += ["" if cell is None else cell.mean, "" if cell is None or cell.err is None else cell.err]
        writer.writerow(values)
    for delta in table.deltas:
        values = [f"delta {delta.variant} - {delta.plain}"]
        for col in table.columns:
            d = delta.cells.get(col)
            values += ["" if d is None else d.diff, "" if d is None or d.lo is None else f"{d.lo}..{d.hi}"]
        writer.writerow(values)
    return out.getvalue()


def render_html(table: Table, title: str = "ringbench leaderboard") -> str:
    from tabulate import tabulate

    from transfer.report_plots import family_bar_charts, ring_schedule_chart

    headers = ["backbone", *(html.escape(c.label) for c in table.columns)]
    rows = [[html.escape(c) for c in r] for r in table_rows(table, lambda t: "\x00" + t + "\x01")]
    rows = [[c.replace("\x00", "<b>").replace("\x01", "</b>") for c in r] for r in rows]
    body = tabulate(rows, headers=headers, tablefmt="unsafehtml", disable_numparse=True)
    figures = [*family_bar_charts(table), *ring_schedule_chart(table)]
    images = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"/>'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, data in figures
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.3em 0.7em; text-align: right; white-space: nowrap; }}
th:first-child, td:first-child {{ text-align: left; }}
tr:nth-child(even) {{ background: #f7f7f7; }}
figure {{ display: inline-block; margin: 1em; }}
figcaption {{ text-align: center; font-size: 0.85em; color: #555; }}
.legend {{ color: #555; font-size: 0.85em; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
{body}
<p class="legend">{html.escape(legend(table))}</p>
<div class="figures">{images}</div>
</body></html>
"""


RENDERERS = {"md": render_markdown, "latex": render_latex, "csv": render_csv, "html": render_html}


def make_table(
    results: Sequence[Path],
    tasks: Sequence[str] | None = None,
    baselines: Sequence[str] = (),
    all_metrics: bool = False,
    records: Sequence[Mapping[str, Any]] | None = None,
) -> Table:
    """The table of the records in ``results`` (or of ``records``, already loaded from them)."""
    from transfer.results import load_records

    if records is None:
        records = load_records(list(results))
    if not records:
        raise UserError(f"no result records in {', '.join(map(str, results))}; run transfer/run.py first")
    return table_from_records(records, tasks, baselines, all_metrics)


def table_from_records(
    records: Sequence[Mapping[str, Any]],
    tasks: Sequence[str] | None = None,
    baselines: Sequence[str] = (),
    all_metrics: bool = False,
) -> Table:
    """The table of these records; ``baselines`` are extra ``PLAIN=VARIANT`` pairs for Δ rows."""
    from transfer.tasks import all_tasks

    pairs = []
    for item in baselines:
        plain, sep, variant = item.partition("=")
        if not sep or not plain or not variant:
            raise UserError(f"--baseline {item!r}: expected PLAIN=VARIANT (backbone names)")
        pairs.append((plain, variant))
    headline = {name: task.headline_metrics for name, task in all_tasks().items()}
    table = build_table(records, tasks=tasks, headline=headline, all_metrics=all_metrics, pairs=pairs)
    if not table.columns:
        raise UserError(f"no records for tasks {list(tasks or [])}")
    names = {r.name for r in table.rows}
    for plain, variant in pairs:
        missing = [n for n in (plain, variant) if n not in names]
        if missing:
            raise UserError(f"--baseline {plain}={variant}: no records for {missing}; backbones: {sorted(names)}")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="transfer/leaderboard.py",
        description="Render result records as one comparison table (rows: backbones; columns: task metrics) with "
        "Δ rows for each plain -> variant pair (ring, HCL or DCL against InfoNCE / NT-Xent).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--results",
        type=Path,
        nargs="+",
        default=[Path("results")],
        help="results folders, record files or .jsonl files",
    )
    parser.add_argument("--format", choices=FORMATS, default="md", help="output format")
    parser.add_argument("--out", type=Path, help="write here (atomically) instead of the terminal")
    parser.add_argument("--tasks", nargs="+", help="only these tasks")
    parser.add_argument(
        "--baseline",
        nargs="+",
        default=[],
        metavar="PLAIN=VARIANT",
        help="extra Δ rows for these backbone pairs (pairs are also found from card metadata)",
    )
    parser.add_argument("--all-metrics", action="store_true", help="every metric, not only each task's headline ones")
    parser.add_argument(
        "--export-jsonl",
        type=Path,
        metavar="FILE",
        help="also write every record (all tasks, one per identity) to FILE as JSON lines (atomically), to share",
    )
    add_common_flags(parser)
    args = parser.parse_args(argv)
    from transfer.results import export_jsonl, load_records

    records = load_records(args.results)
    table = make_table(args.results, args.tasks, args.baseline, args.all_metrics, records=records)
    if args.export_jsonl:
        count = export_jsonl(records, args.export_jsonl)
        print(f"wrote {count} records to {args.export_jsonl}", file=sys.stderr)
    text = RENDERERS[args.format](table)
    if args.out:
        from ringbench.fileio import atomic_write_text

        atomic_write_text(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cli() -> None:
    """Console-script entry point (see pyproject.toml)."""
    sys.exit(run_main(main))


if __name__ == "__main__":
    cli()
