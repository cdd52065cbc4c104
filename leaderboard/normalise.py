"""Normalised tables: each cell as the share of the random -> supervised gap it closes (``--normalise``).

The references are the rows of the same architecture and stem (``leaderboard.model.reference_row``);
the map is affine, so intervals and Δs are mapped alike with the two references held fixed.
"""

from __future__ import annotations

from dataclasses import replace

from leaderboard.model import RANDOM, SUPERVISED, Column, Delta, Table, reference_row

GAP_UNIT = "% of the random→supervised gap"


def normalise(table: Table) -> Table:
    """Each cell as the share of the gap from its random row to its supervised row (same
    architecture and stem) that it closes: ``100 (x - random) / (supervised - random)``. Intervals
    and Δs are mapped by the same affine map, holding the two references fixed; cells without
    both references, or with no gap between them, are left out."""
    if not any(r.reference == RANDOM for r in table.rows) or not any(r.reference == SUPERVISED for r in table.rows):
        raise ValueError("normalising needs a random and a supervised row (method random / supervised)")
    columns = {col: replace(col, unit=GAP_UNIT) for col in table.columns}
    scale: dict[tuple[str, Column], tuple[float, float]] = {}  # (row, column) -> (random value, gap)
    for row in table.rows:
        low, high = reference_row(table, row, RANDOM), reference_row(table, row, SUPERVISED)
        if low is None or high is None:
            continue
        for col in table.columns:
            if (low.key, col) in table.cells and (high.key, col) in table.cells:
                r, s = table.cells[(low.key, col)].mean, table.cells[(high.key, col)].mean
                if s != r:
                    scale[(row.key, col)] = (r, s - r)

    def share(value: float | None, origin: float, gap: float) -> float | None:
        return None if value is None else 100.0 * (value - origin) / gap

    cells = {}
    for (key, col), cell in table.cells.items():
        if (key, col) not in scale:
            continue
        r, gap = scale[(key, col)]
        lo, hi = share(cell.lo, r, gap), share(cell.hi, r, gap)
        if lo is not None and hi is not None and lo > hi:
            lo, hi = hi, lo
        by_seed = (
            {seed: replace(e, mean=100.0 * (e.mean - r) / gap, samples=None) for seed, e in cell.by_seed.items()}
            if cell.by_seed is not None
            else None
        )
        cells[(key, columns[col])] = replace(
            cell,
            mean=100.0 * (cell.mean - r) / gap,
            lo=lo,
            hi=hi,
            sd=None if cell.sd is None else 100.0 * cell.sd / abs(gap),
            samples=None if cell.samples is None else [100.0 * (v - r) / gap for v in cell.samples],
            by_seed=by_seed,
        )
    deltas = []
    for delta in table.deltas:
        mapped = {}
        for col, d in delta.cells.items():
            if (delta.variant, col) in scale:
                gap = scale[(delta.variant, col)][1]
                lo, hi = share(d.lo, 0.0, gap), share(d.hi, 0.0, gap)
                if lo is not None and hi is not None and lo > hi:
                    lo, hi = hi, lo
                mapped[columns[col]] = replace(d, diff=100.0 * d.diff / gap, lo=lo, hi=hi)
        deltas.append(Delta(delta.plain, delta.variant, mapped))
    used = [columns[c] for c in table.columns]
    return replace(
        table,
        columns=used,
        cells=cells,
        deltas=deltas,
        tied={(k, columns[c]) for k, c in table.tied if (k, c) in scale},
        above_random={(k, columns[c]) for k, c in table.above_random if (k, c) in scale},
        below_random={(k, columns[c]) for k, c in table.below_random if (k, c) in scale},
        nonfinite={(k, columns[c]): v for (k, c), v in table.nonfinite.items()},
        implausible={(k, columns[c]) for k, c in table.implausible if (k, c) in scale},
        normalised=True,
    )
