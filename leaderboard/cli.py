"""Turn result records into comparison tables: Markdown, LaTeX, HTML or CSV.

    python -m leaderboard                          # Markdown to the terminal
    python -m leaderboard --format html --out results/leaderboard.html
    python -m leaderboard --tasks syn_det fewshot_digits --baseline moco=ring_moco
    python -m leaderboard --export-jsonl all.jsonl     # also: every record in one file, to share

    python -m leaderboard --cards --latest          # a row per card; newest card of each name
    python -m leaderboard --power 1.0               # replicates needed to detect 1 point

One row per recipe (cards that differ only in their pretraining seed: mean, sd across seeds, n) or
per card (``--cards``), one column per (task, metric, config, unit); every interval says what it is
over and its n; entries not significantly below their column's best are marked (Meta-Dataset's
rule); each plain -> variant pair gets a paired Δ row (the rules: ``leaderboard/deltas.py``). A
missing cell is ``—``, never 0. Published numbers (``configs/published.yaml``) are rows of their own.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from leaderboard.build import build_table, with_published
from leaderboard.deltas import replicate_sds
from leaderboard.model import Column, Table
from leaderboard.normalise import normalise
from leaderboard.text import MISSING, body_rows, headers, legend
from ringbench.cli import add_common_flags, run_main
from ringbench.errors import UserError
from ringbench.stats import replicates_needed

FORMATS = ("md", "latex", "html", "csv")


def _md_escape(text: str) -> str:
    """A cell of a GitHub table: no newline, no unescaped ``|``."""
    return " ".join(text.replace("\\", "\\\\").replace("|", "\\|").split())


def render_markdown(table: Table) -> str:
    from tabulate import tabulate

    rows = [[_md_escape(c) for c in r] for r in body_rows(table, lambda t: f"**{t}**")]
    body = tabulate(rows, headers=[_md_escape(h) for h in headers(table)], tablefmt="github", disable_numparse=True)
    return body + "\n\n" + "\n".join(_md_escape(n) for n in legend(table)) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\n": " ",
    "\r": " ",
}


def latex_escape(text: str) -> str:
    """Text safe in a LaTeX cell: every special character escaped; ± and Δ as math."""
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    return out.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("−", "$-$").replace(MISSING, "--")


def render_latex(table: Table) -> str:
    """A booktabs tabular (``\\usepackage{booktabs}``); marked entries in bold."""
    rows = body_rows(table, lambda t: "\x00" + t + "\x01")
    lines = [
        r"\begin{tabular}{l" + "r" * (len(table.columns) + 1) + "}",
        r"\toprule",
        " & ".join(latex_escape(h) for h in headers(table)) + r" \\",
        r"\midrule",
    ]
    for row in rows:
        cells = [latex_escape(c).replace("\x00", r"\textbf{").replace("\x01", "}") for c in row]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += ["% " + latex_escape(n) for n in legend(table)]
    return "\n".join(lines) + "\n"


CSV_FIELDS = (
    "row",
    "kind",
    "sha256",
    "plain",
    "variant",
    "task",
    "metric",
    "config",
    "unit",
    "mean",
    "flag",  # nonfinite (mean: nan / inf), implausible (a percentage outside [-100, 100]), refused (a Δ)
    "lo",
    "hi",
    "sd",
    "n",
    "over",
    "interval",
    "significant",
    "tied_with_best",
    "above_random",
    "below_random",
    "source",
)


def csv_safe(text: str) -> str:
    """A text field no spreadsheet runs as a formula (a leading ``= + - @``, tab or CR is quoted)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def render_csv(table: Table) -> str:
    """Long format, one line per cell: numbers in numeric columns (mean, lo, hi, sd, n) and the unit."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()

    def write(fields: dict[str, Any]) -> None:
        writer.writerow({k: csv_safe(v) if isinstance(v, str) else v for k, v in fields.items()})

    def place(col: Column) -> dict[str, Any]:
        return {"task": col.task, "metric": col.metric, "config": col.config_label or col.config_hash, "unit": col.unit}

    for row in table.rows:
        kind = "published" if row.published else "recipe" if row.is_recipe else "card"
        for col in table.columns:
            cell = table.cells.get((row.key, col))
            flags = _csv_flags(table, row.key, col)
            if cell is None and (row.key, col) in table.nonfinite:
                write(
                    {
                        "row": row.name,
                        "kind": kind,
                        "sha256": row.sha256,
                        **place(col),
                        "mean": "/".join(dict.fromkeys(table.nonfinite[(row.key, col)])),
                        "flag": flags,
                    }
                )
            if cell is None:
                continue
            write(
                {
                    "row": row.name,
                    "kind": kind,
                    "sha256": row.sha256,
                    **place(col),
                    "mean": cell.mean,
                    "lo": _blank_if_none(cell.lo),
                    "hi": _blank_if_none(cell.hi),
                    "sd": _blank_if_none(cell.sd),
                    "n": _blank_if_none(cell.n),
                    "over": cell.over,
                    "interval": cell.method,
                    "tied_with_best": int((row.key, col) in table.tied),
                    "above_random": int((row.key, col) in table.above_random),
                    "below_random": int((row.key, col) in table.below_random),
                    "source": row.meta.get("source", "") if row.published else "",
                    "flag": flags,
                }
            )
    for delta in table.deltas:
        plain, variant = table.row(delta.plain).name, table.row(delta.variant).name
        for col, d in delta.cells.items():
            if d.refused:
                write(
                    {
                        "row": f"delta {variant} - {plain}",
                        "kind": "delta",
                        "plain": plain,
                        "variant": variant,
                        **place(col),
                        "significant": 0,
                        "flag": "refused",
                    }
                )
                continue
            write(
                {
                    "row": f"delta {variant} - {plain}",
                    "kind": "delta",
                    "plain": plain,
                    "variant": variant,
                    **place(col),
                    "mean": d.diff,
                    "lo": _blank_if_none(d.lo),
                    "hi": _blank_if_none(d.hi),
                    "n": _blank_if_none(d.n),
                    "over": d.over,
                    "interval": d.method,
                    "significant": int(d.significant),
                }
            )
    return out.getvalue()


def _csv_flags(table: Table, key: str, col: Column) -> str:
    """The flags of a cell in the CSV's ``flag`` field: ``nonfinite`` (a card's value is NaN or infinite;
    for a recipe, left out of its mean), ``implausible``; joined by ``;``."""
    found = ["nonfinite"] if (key, col) in table.nonfinite else []
    return ";".join(found + (["implausible"] if (key, col) in table.implausible else []))


def _blank_if_none(value: float | int | None) -> float | int | str:
    """A CSV number field: the value, or empty when there is none (never 0)."""
    return "" if value is None else value


def make_table(
    results: Sequence[Path],
    tasks: Sequence[str] | None = None,
    baselines: Sequence[str] = (),
    all_metrics: bool = False,
    records: Sequence[Mapping[str, Any]] | None = None,
    view: str = "recipes",
    latest: bool = False,
) -> Table:
    """The table of the records in ``results`` (or of ``records``, already loaded from them)."""
    from ringbench.store import load_records

    if records is None:
        records = load_records(list(results))
    if not records:
        raise UserError(f"no result records in {', '.join(map(str, results))}; run transfer/run.py first")
    return table_from_records(records, tasks, baselines, all_metrics, view=view, latest=latest)


def table_from_records(
    records: Sequence[Mapping[str, Any]],
    tasks: Sequence[str] | None = None,
    baselines: Sequence[str] = (),
    all_metrics: bool = False,
    view: str = "recipes",
    latest: bool = False,
) -> Table:
    """The table of these records; ``baselines`` are extra ``PLAIN=VARIANT`` pairs (row names) for Δ rows."""
    from ringbench.published import published_numbers

    pairs = []
    for item in baselines:
        plain, sep, variant = item.partition("=")
        if not sep or not plain or not variant:
            raise UserError(f"--baseline {item!r}: expected PLAIN=VARIANT (row names)")
        pairs.append((plain, variant))
    table = build_table(records, tasks=tasks, all_metrics=all_metrics, pairs=pairs, view=view, latest=latest)
    if not table.columns:
        raise UserError(f"no records for tasks {list(tasks or [])}")
    shown = {c.task for c in table.columns}
    table = with_published(table, sorted((n for n in published_numbers() if n.task in shown), key=lambda n: n.task))
    names = {r.name for r in table.rows}
    for plain, variant in pairs:
        missing = [n for n in (plain, variant) if n not in names]
        if missing:
            raise UserError(f"--baseline {plain}={variant}: no rows named {missing}; rows: {sorted(names)}")
    return table


def power_report(table: Table, delta: float) -> str:
    """How many replicates detect a difference of ``delta`` points at 80% power (two-sided paired
    t-test, α = 0.05), per column and level, from the standard deviations the table's data show."""
    from tabulate import tabulate

    rows = []
    for col in table.columns:
        for level, (sd, n_from) in replicate_sds(table, col).items():
            need = replicates_needed(delta, sd)
            rows.append([col.label, level, f"{sd:.3f}", n_from, MISSING if need is None else need])
    if not rows:
        raise UserError("--power: no column has two paired replicates to estimate a standard deviation from")
    text = tabulate(
        rows,
        headers=["column", "replicates", "sd of a paired difference", "sd from", f"n for Δ={delta:g}"],
        tablefmt="github",
        disable_numparse=True,
    )
    return text + (
        f"\n\nn: replicates per arm for a two-sided paired t-test (α = 0.05) to detect Δ = {delta:g} points with 80% "
        "power. Pretraining seeds: the sd of seed-paired Δs (or √2 × the sd of a recipe's cards when no pair has two "
        "seeds); fine-tuning seeds and episodes: the sd of the per-unit differences of the table's pairs.\n"
    )


def render_html(table: Table) -> str:
    from leaderboard.page import render_page

    return render_page(table)


RENDERERS: dict[str, Callable[[Table], str]] = {
    "md": render_markdown,
    "latex": render_latex,
    "csv": render_csv,
    "html": render_html,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m leaderboard",
        description="Render result records as one comparison table (rows: recipes, i.e. cards that differ only in "
        "their pretraining seed, or cards with --cards; columns: task metrics) with Δ rows for each plain -> "
        "variant pair (ring, HCL or DCL against InfoNCE / NT-Xent).",
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
        help="extra Δ rows for these row pairs (pairs are also found from card metadata)",
    )
    parser.add_argument(
        "--all-metrics", action="store_true", help="every metric, not only each record's headline ones (its task's)"
    )
    parser.add_argument("--cards", action="store_true", help="one row per card instead of one per recipe")
    parser.add_argument("--latest", action="store_true", help="of several cards with one name, keep the newest")
    parser.add_argument(
        "--normalise",
        action="store_true",
        help="show each cell as the share of the gap from the random-initialisation row to the supervised row "
        "(same architecture and stem) that it closes, in %%",
    )
    parser.add_argument(
        "--power",
        type=float,
        metavar="DELTA",
        help="instead of the table: how many pretraining seeds, fine-tuning seeds or episodes a comparison needs to "
        "detect a difference of DELTA points at 80%% power, per column",
    )
    parser.add_argument(
        "--export-jsonl",
        type=Path,
        metavar="FILE",
        help="also write every record (all tasks, one per identity) to FILE as JSON lines (atomically), to share",
    )
    add_common_flags(parser)
    args = parser.parse_args(argv)
    if args.power is not None and not (args.power > 0 and math.isfinite(args.power)):
        raise UserError(f"--power {args.power}: expected a difference in points > 0")
    from ringbench.store import export_jsonl, load_records

    records = load_records(args.results)
    table = make_table(
        args.results,
        args.tasks,
        args.baseline,
        args.all_metrics,
        records=records,
        view="cards" if args.cards else "recipes",
        latest=args.latest,
    )
    if args.normalise:
        try:
            table = normalise(table)
        except ValueError as exc:
            raise UserError(f"--normalise: {exc}; run the random and supervised cards on these tasks") from None
    for warning in table.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.export_jsonl:
        count = export_jsonl(records, args.export_jsonl)
        print(f"wrote {count} records to {args.export_jsonl}", file=sys.stderr)
    text = power_report(table, args.power) if args.power is not None else RENDERERS[args.format](table)
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
