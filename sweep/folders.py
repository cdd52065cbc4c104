"""The trust boundary of a sweep's folder: what is in it is code (submitit's ``*_submitted.pkl`` and its Slurm
scripts run as the sweep's user), so it must be its owner's alone. Folders are created owner-only (0o700), a
folder that another user owns or that group or others may write is refused in one line, and one controller at a
time holds the folder's lock."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ringbench.errors import UserError
from sweep.plan import Layout


def private_dir(folder: Path) -> Path:
    """``folder`` and its missing parents created owner-only (0o700, whatever the umask); an existing one is
    checked by :func:`refuse_shared`, not changed."""
    missing = []
    path = folder
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask; 0o700 needs no more than the owner's bits
    refuse_shared(folder)
    return folder


def refuse_shared(folder: Path) -> None:
    """A :class:`UserError` naming ``folder`` when it is not a folder of this user's that only they may write
    (another owner, or the group or other write bit without the sticky bit)."""
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UserError(f"sweep folder {folder}: not a folder (a link or a file); a sweep's folder must be its own")
    if info.st_uid != os.getuid():
        raise UserError(
            f"sweep folder {folder} belongs to another user (uid {info.st_uid}); what it holds runs as code "
            "(submitit's pickles): use a workdir of your own"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        raise UserError(
            f"sweep folder {folder} can be written by others (mode {stat.S_IMODE(info.st_mode):o}); what it holds "
            f"runs as code (submitit's pickles): chmod go-w {folder}, or use a workdir of your own"
        )


def sweep_folders(layout: Layout) -> list[Path]:
    """The folders a sweep writes code or state into: ``sweeps/``, the plan's folder, ``submitit/``, ``status/``."""
    return [layout.sweep_dir.parent, layout.sweep_dir, layout.sweep_dir / "submitit", layout.status_dir]


def prepare_sweep_folders(layout: Layout) -> None:
    """Every folder of :func:`sweep_folders` owner-only, or a one-line refusal naming the first that is not
    (checked before any is made; what lies below a private ``submitit/``, such as submitit's job folders, no
    one else can reach)."""
    for folder in sweep_folders(layout):
        refuse_shared(folder)
    for folder in sweep_folders(layout):
        private_dir(folder)
