"""Checked, atomic file writes; folders checked before work; one-component names; work-folder locks.

Every file the suite produces (cards, checkpoints, records, caches, tables) goes through
:func:`atomic_write` or :func:`atomic_save`, which write a temporary file in the same folder,
fsync it and rename it over the target; logs grow by whole lines through :func:`append_line`.
A write that cannot complete (a full disk, a read-only file system, no permission, a short
write) raises :class:`WriteError`: one line naming the file, nothing partial left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ringbench.errors import UserError

MIN_FREE_BYTES = 64 * 1024  # a folder with less free space than this is refused before work starts
STALE_AGE_S = 24 * 3600  # a temporary file untouched this long belongs to no running writer
_TEMP_SUFFIXES = (".tmp", ".raw")


class WriteError(UserError, OSError):
    """A file could not be written completely (full disk, read-only, no permission, short write).

    Both a :class:`UserError` (one line, exit 2 on the command line) and an ``OSError``."""


def as_write_error(path: str | os.PathLike, exc: OSError) -> WriteError:
    """``exc`` (an ``OSError`` from writing ``path``) as a one-line :class:`WriteError`."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = {
        errno.ENOSPC: "; free some space or write elsewhere",
        errno.EDQUOT: "; the disk quota is used up",
        errno.EROFS: "; the file system is read-only",
        errno.EACCES: "; no permission to write there",
        errno.EPERM: "; no permission to write there",
    }.get(exc.errno or 0, "")
    err = WriteError(f"{path}: cannot write ({reason}{hint})")
    err.errno = exc.errno
    return err


def temp_prefix(name: str) -> str:
    """The prefix of a temporary sibling of ``name``: ``.<name>.<host>-<pid>.`` (a dot-file, so that
    readers skip it; host and pid tell :func:`remove_stale_temps` whether its writer still runs)."""
    host = socket.gethostname().split(".")[0].replace("-", "_") or "host"
    return f".{name}.{host}-{os.getpid()}."


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it onto ``path`` on success.

    On any exception (a failed or short write, flush, fsync or close: e.g. a full disk) the
    temporary file is removed, ``path`` is left as it was, and the exception propagates; an
    ``OSError`` becomes a one-line :class:`WriteError`. Buffered writes retry short writes until
    every byte is written or the OS reports an error. The file gets the mode a plain ``open``
    would give (0666 minus the umask), not mkstemp's 0600. Text modes write UTF-8 whatever the
    locale. After the rename the folder is fsynced (where the file system allows it), so the new
    name survives a crash too.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise as_write_error(path, exc) from exc
    try:
        try:
            handle: IO = os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8")
        except BaseException:
            os.close(fd)
            raise
        with handle:
            os.chmod(tmp, 0o666 & ~current_umask())
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = _os_error(exc)
        if cause is not None:
            raise as_write_error(path, cause) from exc
        raise
    _fsync_dir(path.parent)


def _os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind a failed write: ``exc`` itself, or the one it was raised while handling
    (``torch.save`` turns a full disk into a ``RuntimeError`` of its zip writer)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None or isinstance(seen, WriteError):
            return None
        if isinstance(seen, OSError) and not isinstance(seen, FileNotFoundError):
            return seen
        seen = seen.__context__
    return None


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log, whole or not at all: a write that fails part-way (a full disk)
    is cut back to the file's previous end and raised as a :class:`WriteError`."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        raise as_write_error(path, exc) from exc
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, "short write")
                view = view[written:]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise as_write_error(path, exc) from exc
    finally:
        os.close(fd)


def check_writable_dir(folder: str | os.PathLike, what: str) -> Path:
    """Prove that files can be created in ``folder`` (or, if it does not exist yet, in the nearest
    folder above it that does), before any work starts, leaving nothing behind.

    A path that is a file, a read-only file system, a folder without permission or a full file
    system is a :class:`UserError` naming the flag's folder (``what``)."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == folder else f"{existing} "
        raise UserError(f"{what} {folder}: {where}is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix("write-check"), suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{what} {folder}: not writable ({exc.strerror or exc})") from exc
    with contextlib.suppress(OSError):
        stat = os.statvfs(existing)
        if stat.f_bavail * stat.f_frsize < MIN_FREE_BYTES:
            raise UserError(f"{what} {folder}: no space left on its file system; free some space or write elsewhere")
    return folder


def remove_stale_temps(
    folder: str | os.PathLike, max_age_s: float = STALE_AGE_S, recursive: bool = False
) -> list[Path]:
    """Remove the temporary dot-files of killed writers in ``folder`` (and its sub-folders when
    ``recursive``: for small trees such as one run's output folder); those removed.

    A temporary file (``.<name>.<host>-<pid>.*.tmp|.raw``) is stale when its writer ran on this
    host and is no longer alive, or when it has not been touched for ``max_age_s`` (a writer on
    another machine, or a name without a pid)."""
    removed: list[Path] = []
    host = temp_prefix("x").split(".")[2].rpartition("-")[0]
    try:
        entries = list(os.scandir(os.fspath(folder)))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        name = entry.name
        if recursive and entry.is_dir(follow_symlinks=False):
            removed += remove_stale_temps(entry.path, max_age_s, recursive)
            continue
        if not name.startswith(".") or not name.endswith(_TEMP_SUFFIXES):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            old = now - entry.stat(follow_symlinks=False).st_mtime > max_age_s
        except OSError:
            continue
        if old or _writer_is_dead(name, host):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _writer_is_dead(name: str, host: str) -> bool:
    for part in name.split("."):
        owner, sep, pid = part.rpartition("-")
        if sep and owner == host and pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            except OSError:
                return False  # alive, another user's
            return False
    return False


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "folder") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``fcntl.flock`` on ``folder/.lock``); a second process
    asking for it gets a :class:`UserError` at once. The kernel drops the lock when the holder dies,
    so a killed run never leaves it behind."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise as_write_error(path, exc) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
            raise UserError(
                f"{what} {folder} is in use by {holder}; wait for it to finish or use another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def resolved_path(path: str | os.PathLike, what: str) -> Path:
    """``path`` made absolute, ``~`` and symlinks resolved; a symlink loop (a link to itself, or links in a
    circle) is one line naming it instead of Python's ``RuntimeError``."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as exc:
        raise UserError(f"{what} {path}: cannot be resolved, a symlink loop? ({exc})") from exc


def path_component(name: str, what: str = "name") -> str:
    """``name`` if it is one safe path component (no separator, not ``.``/``..``, no NUL or control
    character, not hidden), else a :class:`UserError`: names the user gives become folder names,
    and must not reach outside the folders the user chose."""
    text = str(name)
    bad = (
        not text
        or text in (".", "..")
        or text.startswith(".")
        or any(sep in text for sep in ("/", "\\", os.sep))
        or any(ord(c) < 32 or c == "\x7f" for c in text)
        or len(text.encode("utf-8", "surrogateescape")) > 200
    )
    if bad:
        raise UserError(
            f"{what} {name!r}: must be one folder name (no '/', not '.' or '..', not hidden, at most 200 bytes)"
        )
    return text


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``os.umask`` can only
    set it, and a set-and-restore would briefly expose other threads' new files to umask 0)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened or fsynced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    import torch

    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


def read_json_object(path: str | os.PathLike, what: str, hint: str, required: tuple[str, ...] = ()) -> dict:
    """A JSON object a finished piece of work left (a seed's results, a grid point's result), with ``required`` keys;
    anything else (unreadable, not UTF-8, not JSON, not an object, a key missing) is one line naming the file,
    ``what`` it should be and ``hint`` (how to make it again). Never guessed at."""
    import json

    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: damaged {what} ({type(exc).__name__}: {exc}); {hint}") from None
    missing = [key for key in required if not isinstance(data, dict) or key not in data]
    if not isinstance(data, dict) or missing:
        raise UserError(f"{path}: damaged {what} (not a JSON object with {', '.join(required) or 'keys'}); {hint}")
    return data


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (a backbone's identity in results)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
