"""Published reference numbers: methods run elsewhere, as rows that frame a table (DESIGN, "Statistics
in tables": reference rows are random initialisation, supervised, and published numbers with their source).

One kind of data in one place: ``configs/published.yaml`` (shipped with the configs, found through
:func:`ringbench.config.config_root`), one :class:`Published` per (task, metric, method). The file is
checked as it is read, so that a mistyped number is an error naming its entry, never a silent cell.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ringbench.config import config_root, read_yaml_mapping
from ringbench.errors import UserError

PUBLISHED_FILE = "published.yaml"
FIELDS = ("task", "metric", "value", "method", "source")  # every entry has these
OPTIONAL_FIELDS = ("protocol", "checkpoint")


@dataclass(frozen=True)
class Published:
    """A number from the literature for one task and metric (percentage points), with its source."""

    task: str
    metric: str  # the key the task's records use, e.g. "bbox/AP50"
    value: float
    method: str  # e.g. "MoCo v2, 800 epochs"
    source: str  # where the table is: paper and table, or repository file
    protocol: str = ""  # the protocol it was measured with, if the task's name does not say it all
    checkpoint: str = ""  # the zoo entry whose published number this is: its row sits beside that card's


def published_numbers(task: str | None = None, path: str | os.PathLike | None = None) -> list[Published]:
    """The numbers of ``task`` (all tasks when None) in the order the file lists them; empty when none
    can be cited. ``path`` defaults to the shipped ``configs/published.yaml``."""
    numbers = read_published(config_root() / PUBLISHED_FILE if path is None else Path(path))
    return [n for n in numbers if task is None or n.task == task]


def read_published(path: str | os.PathLike) -> list[Published]:
    """Every entry of a published-numbers file, checked: the fields of :class:`Published` (no others),
    non-empty text, a finite number, and one entry per (task, metric, method)."""
    data = read_yaml_mapping(path, "published-numbers file")
    unknown = sorted(map(str, set(data) - {"sources", "numbers"}))
    if unknown:
        raise UserError(f"{path}: unknown top-level keys {unknown} (known: sources, numbers)")
    entries = data.get("numbers") or []
    if not isinstance(entries, list):
        raise UserError(f"{path}: 'numbers' must be a list of entries, got {type(entries).__name__}")
    out: list[Published] = []
    seen: set[tuple[str, str, str]] = set()
    for i, entry in enumerate(entries):
        where = f"{path}: numbers[{i}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a mapping with {', '.join(FIELDS)}, got {type(entry).__name__}")
        missing = [k for k in FIELDS if k not in entry]
        extra = sorted(map(str, set(entry) - {*FIELDS, *OPTIONAL_FIELDS}))
        if missing or extra:
            wrong = ", ".join(f"{what} {keys}" for what, keys in (("missing", missing), ("unknown", extra)) if keys)
            raise UserError(f"{where}: {wrong} (fields: {', '.join(FIELDS)}, optional: {', '.join(OPTIONAL_FIELDS)})")
        for name in (*FIELDS, *OPTIONAL_FIELDS):
            if name != "value" and name in entry and not (isinstance(entry[name], str) and entry[name].strip()):
                raise UserError(f"{where}: {name} must be non-empty text, got {entry[name]!r}")
        value = entry["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{where}: value must be a finite number (percentage points), got {value!r}")
        key = (entry["task"], entry["metric"], entry["method"])
        if key in seen:
            raise UserError(f"{where}: a second entry for task {key[0]}, metric {key[1]}, method {key[2]!r}")
        seen.add(key)
        out.append(Published(**{**entry, "value": float(value)}))
    return out
