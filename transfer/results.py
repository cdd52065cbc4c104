"""The results store: one JSON object per line in ``<results>/records.jsonl``, append-only.

A record (see the README, "Result records")::

    {"backbone", "backbone_sha256", "task", "metrics": {...}, "ci95": {...}, "seeds",
     "config", "config_hash", "engine_versions", "wall_s", "created", ...}

Its identity is ``(backbone_sha256, task, config_hash)``. Lines are appended with a single
``O_APPEND`` write followed by fsync, so concurrent runs never interleave or truncate records.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ringbench.errors import UserError

RECORDS_FILE = "records.jsonl"


def config_hash(config: Mapping[str, Any]) -> str:
    """Short stable hash of a task config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def records_path(results: str | os.PathLike) -> Path:
    """``results`` may be a folder (holding ``records.jsonl``) or a ``.jsonl`` file."""
    results = Path(results)
    return results if results.suffix == ".jsonl" else results / RECORDS_FILE


def load_records(results: str | os.PathLike | Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """All records from a folder (every ``*.jsonl`` in it), a file, or a list of those.

    A line that is not valid JSON (e.g. a file edited by hand) is skipped with a warning naming
    the file and line, rather than hiding every other record.
    """
    sources = [results] if isinstance(results, (str, os.PathLike)) else list(results)
    files: list[Path] = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            files.extend(sorted(src.glob("*.jsonl")))
        elif src.exists():
            files.append(src)
        else:
            raise UserError(f"{src}: no such results file or folder")
    records = []
    for path in files:
        with open(path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    warnings.warn(f"{path}:{lineno}: skipping a line that is not JSON ({exc.msg})", stacklevel=2)
                    continue
                if isinstance(rec, dict) and {"backbone", "task", "metrics"} <= rec.keys():
                    records.append(rec)
                else:
                    warnings.warn(f"{path}:{lineno}: skipping a line that is not a result record", stacklevel=2)
    return records


def find_record(results: str | os.PathLike, backbone_sha256: str, task: str, cfg_hash: str) -> dict | None:
    """The newest record with this identity, or None."""
    path = records_path(results)
    if not path.exists():
        return None
    found = None
    for rec in load_records(path):
        if (rec.get("backbone_sha256"), rec.get("task"), rec.get("config_hash")) == (backbone_sha256, task, cfg_hash):
            found = rec
    return found


def make_record(
    *,
    backbone: str,
    backbone_sha256: str,
    task: str,
    metrics: Mapping[str, float],
    config: Mapping[str, Any],
    ci95: Mapping[str, float] | None = None,
    seeds: Iterable[int] = (),
    engine_versions: Mapping[str, str] | None = None,
    wall_s: float = 0.0,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "backbone": backbone,
        "backbone_sha256": backbone_sha256,
        "task": task,
        "metrics": {k: _num(v) for k, v in metrics.items()},
        "ci95": {k: _num(v) for k, v in (ci95 or {}).items()},
        "seeds": list(seeds),
        "config": dict(config),
        "config_hash": config_hash(config),
        "engine_versions": dict(engine_versions or engine_versions_now()),
        "wall_s": round(float(wall_s), 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def append_record(results: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Append one record as one line with a single O_APPEND write, then fsync."""
    path = records_path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=False, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def engine_versions_now() -> dict[str, str]:
    """Versions of what produced a number: python, torch, torchvision, detectron2 (if loaded)."""
    import sys

    import torch
    import torchvision

    from ringbench import __version__

    versions = {
        "ringbench": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    if "detectron2" in sys.modules:
        versions["detectron2"] = getattr(sys.modules["detectron2"], "__version__", "unknown")
    return versions


def _num(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value
