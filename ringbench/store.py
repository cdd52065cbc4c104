"""The results store: one JSON file per record, named by the record's identity.

Layout of a results folder::

    <results>/<task>/<backbone_sha256>-<config_hash>.json   one record (one line of JSON)
    <results>/*.jsonl                                       legacy stores and exports: one record per line

A record's schema and the rules by which it is read are :mod:`ringbench.records`'. Its identity is
``(task, backbone_sha256, config_hash)``. The file name carries the whole identity (all 64 hex digits of the card's
SHA-256), so finding a record is one ``open`` and never a scan, and two cards cannot share a file.

Why files, not one appended JSONL: many machines write the same store (sweeps on a cluster,
often over NFS, where ``O_APPEND`` is not atomic across machines, and where a short append on a
full disk leaves a partial line the next record is glued to). Each record is written by
:func:`ringbench.fileio.atomic_write`: a temporary dot-file in the same folder, fsync,
``os.replace``. A reader sees no file or a whole one; a failed write raises and leaves nothing.
Two runs of one identity that finish together leave one complete record: the last rename wins.
Readers skip dot-files (writes in progress, or the temporary files of killed writers).

Legacy ``*.jsonl`` files at the top of a results folder (the old ``records.jsonl``, or a file
made by ``leaderboard.py --export-jsonl``) stay readable; nothing appends to them any more.
When an identity is found more than once, the newest (``created``) record wins.

What a reader trusts (a shared store is written by many hands): only regular files are read (a FIFO,
a device, a symlink to one or a folder named like a record file is skipped with a warning naming it,
and is opened without blocking, so nothing hangs); a record file must sit where its identity puts
it (its folder is its ``task``, its name its card SHA-256 and config hash), else it is skipped with
a warning; a ``created`` that is not a time, or lies in the future (past :data:`CLOCK_SKEW`), counts
as the oldest, so that no line claims the newest place; and a record whose metrics are all finite
is kept before a newer one of the same identity with a NaN or infinite metric (a failed rerun does
not hide a real result; both are named in a warning).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import stat
import warnings
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ringbench.errors import UserError
from ringbench.fileio import atomic_write
from ringbench.records import (
    NO_TIME,
    REQUIRED,
    Identity,
    config_hash,
    created_time,
    describe_record,
    has_nonfinite_metric,
    identity_problem,
    preference,
    record_identity,
    record_problem,
)

RECORDS_FILE = "records.jsonl"  # the legacy append-only store, still read


def record_path(results: str | os.PathLike, backbone_sha256: str, task: str, cfg_hash: str) -> Path:
    """The file of the record with this identity: ``<results>/<task>/<sha256>-<config_hash>.json``."""
    problem = identity_problem(backbone_sha256, task, cfg_hash)
    if problem:
        raise ValueError(problem)
    return Path(results) / task / f"{backbone_sha256}-{cfg_hash}.json"


def write_record(results: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Write one record atomically to its identity's file (replacing an older record); its path.

    Raises (leaving no file, whole or partial) if the write fails, e.g. on a full disk.
    """
    results = Path(results)
    if results.suffix == ".jsonl":
        raise UserError(f"{results}: results are written to a folder; .jsonl files are read, never appended to")
    missing = REQUIRED - record.keys()
    if missing:
        raise ValueError(f"not a result record: no {sorted(missing)}")
    problem = record_problem(record)
    if problem:
        raise ValueError(f"not a valid result record: {problem}")
    if "config" in record and config_hash(record["config"]) != record.get("config_hash"):
        raise ValueError(f"config_hash {record.get('config_hash')!r} is not the hash of the record's config")
    path = record_path(results, record.get("backbone_sha256", ""), record["task"], record.get("config_hash", ""))
    data = json.dumps(record, default=str).encode("utf-8") + b"\n"
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return path


def load_records(results: str | os.PathLike | Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """All records from a results folder, a record or ``.jsonl`` file, or a list of those.

    A folder gives every record file under it (any depth) and its top-level ``*.jsonl`` files.
    Unreadable input is skipped with a warning naming the file (and line), rather than hiding
    every other record. One record per identity (the newest); sorted by ``created``.
    """
    sources = [results] if isinstance(results, (str, os.PathLike)) else list(results)
    legacy: list[str] = []
    files: list[str] = []
    for src in sources:
        src = os.fspath(src)
        if os.path.isdir(src):
            top_jsonl, record_files = _scan(src)
            legacy += top_jsonl
            files += record_files
        elif os.path.exists(src) or os.path.islink(src):
            if _not_regular(src, stacklevel=3):
                continue
            (files if src.endswith(".json") else legacy).append(src)
        else:
            raise UserError(f"{src}: no such results file or folder")
    found: list[dict[str, Any]] = []
    for path in legacy:
        found += _read_jsonl(path)
    for path, data in _read_all(files):
        rec = _parse_record_file(path, data)
        if rec is not None and _placed_as_named(path, rec):
            found.append(rec)
    return _newest_per_identity(found)


def find_record(results: str | os.PathLike, backbone_sha256: str, task: str, cfg_hash: str) -> dict | None:
    """The newest record with this identity, or None.

    Opens the identity's one file; scans the ``*.jsonl`` files at the top of the folder (the
    legacy store) only if there are any.
    """
    results = Path(results)
    want = (backbone_sha256, task, cfg_hash)
    candidates: list[dict[str, Any]] = []
    if results.is_file():
        legacy = [str(results)]
    else:
        if identity_problem(*want) is None:
            path = record_path(results, *want)
            rec = _read_record_file(str(path), missing_ok=True)
            if rec is not None and record_identity(rec) == want:
                candidates.append(rec)
            elif rec is not None:
                warnings.warn(f"{path}: ignoring a record whose identity is not its file name", stacklevel=2)
        legacy = _top_jsonl(str(results))
    for jsonl in legacy:
        candidates += [r for r in _read_jsonl(jsonl) if record_identity(r) == want]
    newest = _newest_per_identity(candidates)
    return newest[-1] if newest else None


def export_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> int:
    """Write records as one JSONL file (atomically), e.g. to share a store; how many were written."""
    lines = [json.dumps(rec, default=str) for rec in records]
    with atomic_write(path, "wb") as handle:
        handle.write("".join(line + "\n" for line in lines).encode("utf-8"))
    return len(lines)


def _scan(root: str) -> tuple[list[str], list[str]]:
    """``(top-level *.jsonl files, *.json files at any depth)`` under ``root``, sorted; dot-entries skipped."""
    top_jsonl: list[str] = []
    record_files: list[str] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = os.scandir(folder)
        except OSError as exc:
            warnings.warn(f"{folder}: skipping a folder that cannot be read ({exc.strerror})", stacklevel=3)
            continue
        with entries:
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue
                if name.endswith(".json") or (folder == root and name.endswith(".jsonl")):
                    # is_file() costs no system call for a regular file on most file systems (d_type)
                    if entry.is_file() or not _not_regular(entry.path, stacklevel=4):
                        (record_files if name.endswith(".json") else top_jsonl).append(entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return sorted(top_jsonl), sorted(record_files)


def _top_jsonl(root: str) -> list[str]:
    try:
        with os.scandir(root) as entries:
            found = sorted(e.path for e in entries if e.name.endswith(".jsonl") and not e.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [path for path in found if not _not_regular(path, stacklevel=4)]


class NotRegularFile(OSError):
    """A store path that is not a regular file (a FIFO, a device, a folder, a socket), and so is not read."""


def _kind(mode: int) -> str:
    """What a file that is not a regular one is, in words."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _not_regular(path: str, stacklevel: int = 3) -> bool:
    """True (with a warning naming ``path``) if ``path`` is not a regular file, or a symlink to one.

    Checked before a store file is opened: reading a FIFO blocks until someone writes to it, and a
    device may never end (``/dev/zero``); a folder named like a record cannot be read either."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        warnings.warn(f"{path}: skipping a store entry that cannot be read ({exc.strerror})", stacklevel=stacklevel)
        return True
    if stat.S_ISREG(mode):
        return False
    link = " (a symlink to it)" if os.path.islink(path) else ""
    warnings.warn(
        f"{path}: skipping a store entry that is {_kind(mode)}{link}, not a regular file", stacklevel=stacklevel
    )
    return True


def _open_regular(path: str) -> int:
    """A descriptor of ``path`` opened for reading, if it is a regular file; raises :class:`NotRegularFile`
    otherwise. ``O_NONBLOCK`` makes opening a FIFO return at once (without it, ``open`` waits for a writer),
    and ``fstat`` checks what was opened, so a file swapped for a FIFO after a scan cannot hang a reader."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(0, f"{_kind(mode)}, not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_bytes(path: str) -> bytes | OSError:
    try:
        with open(_open_regular(path), "rb") as handle:
            return handle.read()
    except IsADirectoryError as exc:
        return NotRegularFile(exc.errno, "a folder, not a regular file", path)
    except OSError as exc:
        return exc


def _read_chunk(paths: list[str]) -> list[bytes | OSError]:
    return [_read_bytes(path) for path in paths]


def _read_all(paths: list[str], threads: int = 8, chunk: int = 512) -> Iterator[tuple[str, bytes | OSError]]:
    """``(path, its bytes or the error)`` in order. Large stores are read by a few threads: opening
    a file is mostly waiting (a round trip to the server on NFS), and it releases the GIL."""
    if len(paths) <= chunk:
        yield from zip(paths, _read_chunk(paths))
        return
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for names, contents in zip(chunks, pool.map(_read_chunk, chunks)):
            yield from zip(names, contents)


def _read_record_file(path: str, missing_ok: bool = False) -> dict[str, Any] | None:
    """One record file, or None (with a warning naming the file if it is not a record)."""
    data = _read_bytes(path)
    if isinstance(data, FileNotFoundError) and missing_ok:
        return None
    return _parse_record_file(path, data, stacklevel=4)


def _parse_record_file(path: str, data: bytes | OSError, stacklevel: int = 3) -> dict[str, Any] | None:
    """The record in a file's bytes, or None with a warning naming the file."""
    if isinstance(data, OSError):
        if isinstance(data, FileNotFoundError):
            why = "vanished while reading"
        elif isinstance(data, NotRegularFile):
            why = f"is {data.strerror}"
        else:
            why = f"cannot be read ({data.strerror})"
        warnings.warn(f"{path}: skipping a record file that {why}", stacklevel=stacklevel)
        return None
    try:
        rec = json.loads(data)
    except UnicodeDecodeError:
        warnings.warn(f"{path}: skipping a record file that is not UTF-8", stacklevel=stacklevel)
        return None
    except (ValueError, RecursionError) as exc:
        warnings.warn(
            f"{path}: skipping a record file that is not JSON ({getattr(exc, 'msg', exc)})", stacklevel=stacklevel
        )
        return None
    if not isinstance(rec, dict) or not REQUIRED <= rec.keys():
        warnings.warn(f"{path}: skipping a file that is not a result record", stacklevel=stacklevel)
        return None
    problem = record_problem(rec)
    if problem:
        warnings.warn(f"{path}: skipping a record with {problem}", stacklevel=stacklevel)
        return None
    return rec


def _placed_as_named(path: str, rec: Mapping[str, Any]) -> bool:
    """True if a record file sits where its identity puts it: ``<task>/<sha256>-<config_hash>.json``.
    Else (with a warning naming the file) False: a record copied or renamed into another task's folder,
    or under another card's name, would otherwise show as that task's or be found for that card."""
    folder, name = os.path.split(os.path.abspath(path))
    ident = record_identity(rec)
    if ident is None:
        why = "no full identity (backbone_sha256, task, config_hash)"
    elif os.path.basename(folder) != ident[1]:
        why = f"'task' {ident[1]!r} that is not its folder's name {os.path.basename(folder)!r}"
    elif name != f"{ident[0]}-{ident[2]}.json":
        why = "a file name that is not its identity (<backbone_sha256>-<config_hash>.json)"
    else:
        return True
    warnings.warn(f"{path}: skipping a record file with {why}", stacklevel=3)
    return False


def record_target_problem(results: str | os.PathLike, backbone_sha256: str, task: str, cfg_hash: str) -> str | None:
    """Why the record of this identity could not be written (or None): its path holds a folder, which
    ``os.replace`` cannot replace. ``transfer/run.py`` asks before any work, so that a run is not lost
    at its end; a FIFO, a device or a symlink there is replaced by the record, as any old record is."""
    path = record_path(results, backbone_sha256, task, cfg_hash)
    if path.is_dir() and not path.is_symlink():
        return f"{path}: a folder is where this run's record file goes; move it away, or use another --results"
    return None


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSONL file; a bad line is skipped with a warning naming the file and line."""
    records: list[dict[str, Any]] = []
    try:
        handle = open(_open_regular(path), "rb")
    except OSError as exc:
        why = f"is {exc.strerror}" if isinstance(exc, NotRegularFile) else f"cannot be read ({exc.strerror})"
        warnings.warn(f"{path}: skipping a results file that {why}", stacklevel=3)
        return records
    with handle:
        for lineno, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except UnicodeDecodeError:
                warnings.warn(f"{path}:{lineno}: skipping a line that is not UTF-8", stacklevel=3)
                continue
            except (ValueError, RecursionError) as exc:
                msg = getattr(exc, "msg", exc)
                warnings.warn(f"{path}:{lineno}: skipping a line that is not JSON ({msg})", stacklevel=3)
                continue
            if not isinstance(rec, dict) or not REQUIRED <= rec.keys():
                warnings.warn(f"{path}:{lineno}: skipping a line that is not a result record", stacklevel=3)
            elif problem := record_problem(rec):
                warnings.warn(f"{path}:{lineno}: skipping a record with {problem}", stacklevel=3)
            else:
                records.append(rec)
    return records


def _newest_per_identity(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per identity, by :func:`preference` (finite, then newest; a tie goes to the later one
    in the list, i.e. a record file over a legacy line); records without a full identity are all kept.
    A future ``created`` and a record set aside for a NaN are named in a warning. Sorted by
    :func:`created_time` (stable)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    newest: dict[Identity, int] = {}
    keep = [True] * len(records)
    for i, rec in enumerate(records):
        key = record_identity(rec)
        if key is None:
            continue
        j = newest.get(key)
        if j is not None:
            old = records[j]
            for r in (rec, old):
                if created_time(r, now) is NO_TIME and r.get("created"):
                    warnings.warn(
                        f"record {describe_record(r)}: 'created' {r.get('created')!r} is not a past time; it counts as "
                        "the oldest of its identity",
                        stacklevel=3,
                    )
            if has_nonfinite_metric(rec) != has_nonfinite_metric(old):
                bad = rec if has_nonfinite_metric(rec) else old
                warnings.warn(
                    f"record {describe_record(bad)} has a NaN or infinite metric; the record of its identity "
                    "with finite metrics is kept",
                    stacklevel=3,
                )
            if preference(rec, now) >= preference(old, now):
                keep[j] = False
            else:
                keep[i] = False
                continue
        newest[key] = i
    kept = [rec for rec, k in zip(records, keep) if k]
    kept.sort(key=lambda rec: created_time(rec, now))
    return kept
