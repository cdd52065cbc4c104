"""The result record: its schema, identity and the rules by which it is read (units, headline metrics,
which of two records of one identity is kept). Pure functions on dicts; the files are :mod:`ringbench.store`'s.

A record (see docs/formats.md, "Result record")::

    {"backbone", "backbone_sha256", "task", "metrics": {...}, "units": {...}, "headline": [...],
     "ci95": {...}, "seeds", "config", "config_hash", "engine_versions", "wall_s", "created", ...}

Its identity is ``(task, backbone_sha256, config_hash)``; the config holds the seeds, so its hash covers them.

Records describe themselves, so that a reader needs no task registry: ``units`` (read by :func:`in_percent`)
and ``headline``, the metrics a table shows by default (read by :func:`record_headline`; a record written
before the field existed shows every metric). Of two records of one identity (:func:`preference`), one whose
metrics are all finite is kept before one with a NaN or infinite metric (a failed rerun does not hide a real
result), then the newer; a ``created`` that is not a time, or lies in the future past :data:`CLOCK_SKEW`,
counts as the oldest, so that no record claims the newest place.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import platform
import re
from collections.abc import Iterable, Mapping
from typing import Any

PERCENT = "percent"  # percentage points (0-100), the unit every metric is stored in
# Units a record may declare, and the factor that turns each into percentage points.
UNIT_TO_PERCENT = {PERCENT: 1.0, "fraction": 100.0}
REQUIRED = frozenset({"backbone", "task", "metrics"})
_TASK_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_HASH_RE = re.compile(r"[A-Za-z0-9_]{1,128}")  # no '-': it separates the two hashes in a file name

Identity = tuple[str, str, str]  # (backbone_sha256, task, config_hash)
# How far in the future a record's ``created`` may lie (the clocks of a cluster's machines differ a little);
# beyond it the time is not believed, and the record counts as the oldest of its identity.
CLOCK_SKEW = _dt.timedelta(hours=1)


def config_hash(config: Mapping[str, Any]) -> str:
    """Short stable hash of a task config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def identity_problem(backbone_sha256: Any, task: Any, cfg_hash: Any) -> str | None:
    """Why this identity cannot name a file (or None): its parts must be plain, path-safe tokens
    (real ones are hex digests and registry names), so that distinct identities get distinct names."""
    if not isinstance(task, str) or not _TASK_RE.fullmatch(task):
        return f"task {task!r}: expected letters, digits, '_', '.', '+' or '-' (not first)"
    for name, value in (("backbone_sha256", backbone_sha256), ("config_hash", cfg_hash)):
        if not isinstance(value, str) or not _HASH_RE.fullmatch(value):
            return f"{name} {value!r}: expected hex digits (letters, digits or '_')"
    return None


def record_identity(rec: Mapping[str, Any]) -> Identity | None:
    sha, task, cfg = rec.get("backbone_sha256"), rec.get("task"), rec.get("config_hash")
    if isinstance(sha, str) and isinstance(task, str) and isinstance(cfg, str) and sha and task and cfg:
        return sha, task, cfg
    return None


_TYPES: dict[str, tuple[type, ...]] = {  # the value type of every field a reader relies on
    "backbone": (str,),
    "task": (str,),
    "metrics": (dict,),
    "ci95": (dict,),
    "seeds": (list,),
    "config": (dict,),
    "config_hash": (str,),
    "backbone_sha256": (str,),
    "created": (str,),
    "family": (str,),
    "engine_versions": (dict,),
    "backbone_meta": (dict,),
    "extra": (dict,),
    "wall_s": (int, float),
    "headline": (list,),
}


def record_problem(rec: Mapping[str, Any]) -> str | None:
    """What makes ``rec`` unusable by the readers (tables, comparisons), in a few words; None if nothing.

    Fields of the wrong type, metrics or intervals that are not numbers, per-seed metrics that
    are not mappings. Checked on every read, so that one bad record is skipped with a warning
    instead of breaking every table and every later run on its store."""
    for key, types in _TYPES.items():
        value = rec.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            return f"{key!r} of type {type(value).__name__} (expected {' or '.join(t.__name__ for t in types)})"
    if not rec["backbone"] or not rec["task"]:
        return "an empty 'backbone' or 'task'"
    for key in ("metrics", "ci95"):
        for name, value in (rec.get(key) or {}).items():
            if not _is_number(value):
                return f"{key}[{name!r}] = {value!r}, not a number"
    per_seed = (rec.get("extra") or {}).get("per_seed")
    if per_seed is not None and (
        not isinstance(per_seed, list)
        or not all(isinstance(s, dict) and all(map(_is_number, s.values())) for s in per_seed)
    ):
        return "extra['per_seed'] that is not a list of metric mappings"
    if not all(isinstance(m, str) and m for m in rec.get("headline") or []):
        return "a 'headline' that is not a list of metric names"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


NO_TIME = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)


def created_time(rec: Mapping[str, Any], now: _dt.datetime | None = None) -> _dt.datetime:
    """When ``rec`` was made (UTC), for choosing the newest record; the oldest possible time when its
    ``created`` is missing, not an ISO time, or lies in the future by more than :data:`CLOCK_SKEW`, so
    that a line cannot take a newer record's place by claiming a time to come. (Times are compared as
    times: ``...+02:00`` and ``...Z`` are ordered by the instant they name, not as text.)"""
    text = rec.get("created")
    if not isinstance(text, str) or not text:
        return NO_TIME
    try:
        when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        return NO_TIME
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return NO_TIME if when > now + CLOCK_SKEW else when


def has_nonfinite_metric(rec: Mapping[str, Any]) -> bool:
    """True if one of the record's metrics is NaN or infinite (a diverged or failed run)."""
    return any(isinstance(v, float) and not math.isfinite(v) for v in (rec.get("metrics") or {}).values())


def preference(rec: Mapping[str, Any], now: _dt.datetime | None = None) -> tuple[bool, _dt.datetime]:
    """The order in which records of one identity are preferred: a record whose metrics are all finite
    before one with a NaN or infinite metric (which never displaces a real result), then the newest by
    :func:`created_time`."""
    return (not has_nonfinite_metric(rec), created_time(rec, now))


def describe_record(rec: Mapping[str, Any]) -> str:
    return f"{rec.get('backbone')!r} on {rec.get('task')!r} (created {rec.get('created')!r})"


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
    units: Mapping[str, str] | None = None,
    headline: Iterable[str] = (),
    **extra: Any,
) -> dict[str, Any]:
    """A record; ``units`` names each metric's unit (default: percentage points, as every ringbench
    task reports, Detectron2's AP included); ``headline`` the metrics a table shows by default (the
    task's; every metric when it names none)."""
    units = dict(units or {})
    return {
        "backbone": backbone,
        "backbone_sha256": backbone_sha256,
        "task": task,
        "metrics": {k: _num(v) for k, v in metrics.items()},
        "units": {k: units.get(k, PERCENT) for k in metrics},
        "headline": ([headline] if isinstance(headline, str) else list(headline)) or list(metrics),
        "ci95": {k: _num(v) for k, v in (ci95 or {}).items()},
        "seeds": list(seeds),
        "config": dict(config),
        "config_hash": config_hash(config),
        "engine_versions": dict(engine_versions or engine_versions_now()),
        "wall_s": round(float(wall_s), 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def in_percent(rec: Mapping[str, Any]) -> dict[str, Any]:
    """The record with every metric in percentage points: the one rule by which records are read.

    * A record that has ``units`` states each metric's unit: ``percent`` is kept, ``fraction`` is
      multiplied by 100 (the metric, its ``ci95``, ``extra.per_seed`` and ``extra.per_episode``);
      another unit is kept as it is, and the table shows it in the column's name.
    * A record without ``units`` was written before units were recorded; it is read as percent,
      because every ringbench version wrote percentage points (Detectron2's AP; accuracies x 100
      since the first few-shot and linear tasks). ``units_from`` says which case applied.
    * ``extra.episode_accuracies`` (few-shot, per source and episode) are fractions in every version.
    """
    metrics = rec.get("metrics") or {}
    declared = rec.get("units")
    if not isinstance(declared, Mapping):
        return {**rec, "units": {k: PERCENT for k in metrics}, "units_from": "legacy rule"}
    factors = {k: UNIT_TO_PERCENT.get(str(declared.get(k, PERCENT)), 1.0) for k in metrics}
    units = {k: PERCENT if str(declared.get(k, PERCENT)) in UNIT_TO_PERCENT else str(declared[k]) for k in metrics}
    if all(f == 1.0 for f in factors.values()):
        return {**rec, "units": units, "units_from": "record"}

    def scaled(values: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v * factors[k] if k in factors and isinstance(v, (int, float)) else v for k, v in values.items()}

    extra = dict(rec.get("extra") or {})
    if isinstance(extra.get("per_seed"), list):
        extra["per_seed"] = [scaled(s) if isinstance(s, Mapping) else s for s in extra["per_seed"]]
    if isinstance(extra.get("per_episode"), Mapping):
        extra["per_episode"] = {
            k: [v * factors.get(k, 1.0) for v in values] if isinstance(values, list) else values
            for k, values in extra["per_episode"].items()
        }
    return {
        **rec,
        "metrics": scaled(metrics),
        "ci95": scaled(rec.get("ci95") or {}),
        "extra": extra,
        "units": units,
        "units_from": "record",
    }


def record_headline(rec: Mapping[str, Any]) -> list[str]:
    """The metrics a table shows of ``rec`` by default: those of its ``headline`` that it has. A record
    without one (written before the field existed) or with an empty one shows every metric."""
    metrics = rec.get("metrics") or {}
    headline = rec.get("headline")
    return [m for m in headline if m in metrics] if headline else list(metrics)


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
