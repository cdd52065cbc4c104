"""The text of a comparison table, shared by every format: cells, Δs, ranks, rows and the notes
that say what each number and mark means."""

from __future__ import annotations

from collections.abc import Callable

from leaderboard.model import (
    EPISODES,
    FT_SEEDS,
    LOWSHOT_SAMPLES,
    PT_SEEDS,
    TEST_IMAGES,
    Column,
    Delta,
    DeltaCell,
    Estimate,
    Table,
)
from leaderboard.normalise import GAP_UNIT
from ringbench.records import PERCENT

MISSING = "—"
NONFINITE = "!"  # after a NaN or infinite value, shown as written ("nan!", "inf!"), never as MISSING
IMPLAUSIBLE = "?"  # after a percentage outside [-100, 100]
REFUSED = "refused"  # a Δ whose estimate lies outside its own interval
ABOVE_RANDOM = "†"  # significantly above the random-initialisation row
BELOW_RANDOM = "‡"  # significantly below it
# What an interval is over, as a cell abbreviates it.
SHORT = {EPISODES: "ep", FT_SEEDS: "ft", PT_SEEDS: "pt", TEST_IMAGES: "img", LOWSHOT_SAMPLES: "smp"}


# Characters that would act rather than show: C0/C1 controls, and the bidirectional embeddings, overrides and
# isolates that can reorder the text around them (a name "x\u202egnp.exe" displays as "xexe.png").
_ACTING = {c for c in range(0x20)} | {0x7F} | set(range(0x80, 0xA0)) | {0x061C, 0x200E, 0x200F}
_ACTING |= set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A))
_BREAKS = "\t\n\r\x0b\x0c"


def visible(text: str) -> str:
    """``text`` with every control or bidirectional-formatting character written as its escape (``\\u202e``),
    so that a hostile card or task name shows as what it is and cannot reorder or break what follows it; line
    breaks and tabs become spaces, as the tables always showed them."""
    if not any(ord(ch) in _ACTING for ch in text):
        return text
    return "".join(" " if ch in _BREAKS else f"\\u{ord(ch):04x}" if ord(ch) in _ACTING else ch for ch in text)


def short(text: str, limit: int = 28) -> str:
    """A figure's label: ``text`` (made :func:`visible`) cut to ``limit`` characters with an ellipsis; the table
    beside the figure has the full name."""
    text = visible(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def n_text(n: int | None, over: str) -> str:
    """``600 ep``: how many units an interval is over, and which (empty when unknown)."""
    return f"{n} {SHORT.get(over, over)}" if n is not None and over else ""


def _n(n: int | None, over: str) -> str:
    text = n_text(n, over)
    return f" ({text})" if text else ""


def cell_value(cell: Estimate) -> str:
    """``mean ± half-width`` for a card, ``mean sd s`` for a recipe of several seeds."""
    text = f"{cell.mean:.2f}"
    if cell.by_seed is not None and cell.sd is not None:
        return f"{text} sd {cell.sd:.2f}"
    if cell.has_interval:
        text += f" ± {(cell.hi - cell.lo) / 2:.2f}"  # type: ignore[operator]
    return text


def fmt_cell(cell: Estimate | None) -> str:
    """``mean ± half-width (n ep|ft)`` for a card, ``mean sd s (n pt)`` for a recipe of several seeds."""
    if cell is None:
        return MISSING
    return cell_value(cell) + _n(cell.n, cell.over)


def delta_value(delta: DeltaCell) -> str:
    """``diff [lo, hi]*``: the difference, its interval when the data give one, * when it excludes 0;
    ``refused`` when its estimate lies outside its own interval (the warning says why)."""
    if delta.refused:
        return REFUSED
    text = f"{delta.diff:+.2f}"
    if delta.lo is not None and delta.hi is not None:
        text += f" [{delta.lo:+.2f}, {delta.hi:+.2f}]" + ("*" if delta.significant else "")
    return text


def fmt_delta(delta: DeltaCell | None) -> str:
    if delta is None:
        return MISSING
    return delta_value(delta) + _n(delta.n, delta.over)


def fmt_rank(rank: tuple[float | None, int], columns: int) -> str:
    value, count = rank
    return MISSING if value is None else f"{value:.1f} ({count}/{columns})"


def headers(table: Table) -> list[str]:
    return [row_header(table), *(visible(c.label) for c in table.columns), "avg rank"]


def row_header(table: Table) -> str:
    return "recipe" if table.view == "recipes" else "card"


def cell_text(table: Table, row_key: str, col: Column, mark_tied: Callable[[str], str]) -> str:
    """A cell's text with its marks: ``mark_tied`` for an entry not significantly below its
    column's best, † (‡) for one significantly above (below) its random-initialisation row, and
    the flags of :func:`flag_marks` (``nan!``, ``?``)."""
    cell = table.cells.get((row_key, col))
    if cell is None and (row_key, col) in table.nonfinite:
        return nonfinite_text(table.nonfinite[(row_key, col)])
    text = fmt_cell(cell) + random_mark(table, row_key, col) + flag_marks(table, row_key, col)
    return mark_tied(text) if (row_key, col) in table.tied else text


def nonfinite_text(values: list[str]) -> str:
    """``nan!``: the non-finite values of a cell's cards (each kind once), marked."""
    return "/".join(dict.fromkeys(values)) + NONFINITE


def flag_marks(table: Table, row_key: str, col: Column) -> str:
    """``?`` for an implausible percentage (out of bests, marks and ranks); `` +nan!`` for a recipe's cell
    whose mean leaves out a card with a NaN or infinite value (a card's own such value is the whole cell)."""
    text = IMPLAUSIBLE if (row_key, col) in table.implausible else ""
    if (row_key, col) in table.nonfinite and (row_key, col) in table.cells:
        text += " +" + nonfinite_text(table.nonfinite[(row_key, col)])
    return text


def random_mark(table: Table, row_key: str, col: Column) -> str:
    """† for a cell significantly above its random-initialisation row, ‡ for one significantly below."""
    if (row_key, col) in table.above_random:
        return ABOVE_RANDOM
    return BELOW_RANDOM if (row_key, col) in table.below_random else ""


def delta_label(table: Table, delta: Delta) -> str:
    return f"Δ {visible(table.row(delta.variant).name)} − {visible(table.row(delta.plain).name)}"


def body_rows(table: Table, mark_tied: Callable[[str], str], columns: list[Column] | None = None) -> list[list[str]]:
    """Body rows as text (names made :func:`visible`, not yet escaped for a format), each row followed by its Δ rows,
    over ``columns``
    (all by default), with the average rank over all of the table's columns last."""
    columns = table.columns if columns is None else columns
    rows = []
    deltas_after: dict[str, list[Delta]] = {}
    for d in table.deltas:
        deltas_after.setdefault(d.variant, []).append(d)
    for row in table.rows:
        cells = [cell_text(table, row.key, col, mark_tied) for col in columns]
        rank = MISSING if row.published else fmt_rank(table.ranks.get(row.key, (None, 0)), table.ranked)
        rows.append([visible(row.name), *cells, rank])
        for delta in deltas_after.get(row.key, []):
            rows.append([delta_label(table, delta), *(fmt_delta(delta.cells.get(c)) for c in columns), ""])
    return rows


def flag_notes(table: Table) -> list[str]:
    """The legend's lines for the flags the table shows: non-finite values, implausible ones, refused Δs."""
    notes = []
    if table.nonfinite:
        notes.append(
            f"nan{NONFINITE} / inf{NONFINITE}: the record's value is NaN or infinite (a failed or diverged run): it "
            f"was run, and is left out of bests, ranks, Δs and means (+nan{NONFINITE} after a recipe's mean: a card "
            "left out of it)."
        )
    if table.implausible:
        notes.append(
            f"{IMPLAUSIBLE}: implausible, a percentage outside [−100, 100] (a wrong unit or scale in the record?); "
            "shown as recorded, and left out of bests, marks and ranks."
        )
    if any(d.refused for delta in table.deltas for d in delta.cells.values()):
        notes.append(
            f"{REFUSED}: a Δ whose estimate lies outside its own interval (a record's metric disagrees with its "
            "per-episode or per-seed samples); not shown, see the warning."
        )
    return notes


def legend(table: Table) -> list[str]:
    """The notes under a table: units, what each interval is, the marks, and any warning."""
    units = {c.unit for c in table.columns}
    if table.normalised:
        notes = [
            f"Values in {GAP_UNIT}: 100 (x − random) / (supervised − random), the reference rows of the same "
            "architecture and stem (0 = random initialisation, 100 = supervised); intervals mapped alike, "
            "the references held fixed."
        ]
    else:
        notes = ["Values in percentage points." if units == {PERCENT} else "Values in percentage points unless named."]
    kinds = {(c.over, c.by_seed is not None) for c in table.cells.values() if c.n is not None and c.over}
    spread = []
    if (EPISODES, False) in kinds:
        spread.append("± x (n ep): 95% interval over n episodes")
    if (FT_SEEDS, False) in kinds:
        spread.append("± x (n ft): 95% interval over n fine-tuning seeds (none for one seed)")
    if (TEST_IMAGES, False) in kinds:
        spread.append("± x (n img): 95% interval over n test images (paired image by image in a Δ)")
    if (LOWSHOT_SAMPLES, False) in kinds:
        spread.append("± x (n smp): 95% interval over n low-shot samples")
    if (PT_SEEDS, True) in kinds:
        spread.append("sd x (n pt): standard deviation across a recipe's n pretraining seeds (the row: their mean)")
    if spread:
        notes.append("; ".join(spread) + ".")
    methods = table.methods()
    if methods:
        notes.append("Intervals: " + "; ".join(methods) + ".")
    if table.deltas:
        notes.append(
            "Δ rows: variant minus plain twin, [95% interval] over paired units (recipes: cards paired by pretraining "
            "seed; cards: the same episodes or fine-tuning seeds); * = the interval excludes 0; one unit: no interval."
        )
    notes.append(
        "Marked: not significantly below the column's best (Meta-Dataset's rule; an entry with no interval "
        "cannot be shown to be below). avg rank: mean rank over the columns a row has (of all ranked columns; "
        "a mean or average is not ranked beside its own parts)."
    )
    marks = [
        (m, word)
        for m, word, cells in ((ABOVE_RANDOM, "above", table.above_random), (BELOW_RANDOM, "below", table.below_random))
        if cells
    ]
    if marks:
        notes.append(
            f"{' / '.join(m for m, _ in marks)}: significantly {' / '.join(w for _, w in marks)} the "
            "random-initialisation row of the same architecture and stem (compared as a Δ row is: paired by "
            "pretraining seed where seeds are shared, else Welch's t over the recipes' cards)."
        )
    for row in table.rows:
        if row.published:
            notes.append(f"{row.name}: {row.meta.get('source', '')}; not run here, no interval.")
    notes += flag_notes(table)
    notes.append(f"{MISSING} = not run.")
    return notes + [f"Warning: {w}" for w in table.warnings]
