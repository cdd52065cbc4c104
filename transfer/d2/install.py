"""Install Detectron2 v0.6 on machines that cannot build it (``python -m transfer.d2.install``).

Detectron2 is not published on the package index. Where the real thing (with its compiled ops)
is already importable, this does nothing. Otherwise it

1. installs Detectron2's pure-Python requirements with pip (``-c constraints.txt`` when the
   repository's constraints file sits next to the package);
2. downloads the source archive ``pb1-detectron2==0.6`` (whose ``detectron2/`` tree is upstream
   v0.6 without the C++ sources) with ``pip download``; its ``setup.py`` imports torch even to
   read metadata, hence ``--no-build-isolation`` and torch already installed;
3. checks the archive's SHA-256 (a mismatch aborts, nothing is installed);
4. copies ``detectron2/`` into site-packages atomically (to a temporary sibling folder, then a
   rename), with a marker file recording where it came from.

The missing compiled ops are stood in for by :mod:`transfer.d2.compat` at import time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ringbench.cli import add_common_flags, run_main
from ringbench.errors import UserError
from ringbench.fileio import sha256_file

ARCHIVE_REQUIREMENT = "pb1-detectron2==0.6"
ARCHIVE_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
DETECTRON2_VERSION = "0.6"
MARKER = ".ringbench-install.json"
EXTRA = "detectron2"  # the project's optional-dependency group holding Detectron2's requirements


def requirements() -> list[str]:
    """Detectron2 v0.6's pure-Python requirements, as the project's metadata lists them (the
    ``detectron2`` extra of pyproject.toml: the one list of them)."""
    from importlib import metadata

    try:
        listed = metadata.requires("ringbench") or []
    except metadata.PackageNotFoundError as exc:
        raise UserError("ringbench is not installed: run `make setup` or `pip install -e .` first") from exc
    marker = re.compile(r"""^\s*extra\s*==\s*["']""" + EXTRA + r"""["']\s*$""")
    found = [req.split(";", 1)[0].strip() for req in listed if ";" in req and marker.match(req.split(";", 1)[1])]
    if not found:
        raise UserError(f"the installed ringbench metadata lists no '{EXTRA}' requirements; reinstall the project")
    return found


def _say(message: str) -> None:
    print(f"[detectron2 install] {message}", flush=True)


def site_packages() -> Path:
    """The running interpreter's site-packages (where pip puts pure-Python packages)."""
    return Path(sysconfig.get_paths()["purelib"])


def probe(python: str = sys.executable) -> str:
    """How Detectron2 stands in ``python``: ``"compiled"``, ``"python-only"`` or ``"absent"``.

    Probed in a child interpreter so that this process imports nothing of Detectron2.
    """
    code = (
        "import importlib.util as u, sys\n"
        "spec = u.find_spec('detectron2')\n"
        "if spec is None: print('absent'); sys.exit()\n"
        "try:\n"
        "    import detectron2._C\n"
        "    print('compiled')\n"
        "except Exception:\n"
        "    print('python-only')\n"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    state = out.stdout.strip().splitlines()[-1:] or ["absent"]
    return state[0] if state[0] in ("compiled", "python-only", "absent") else "absent"


def installed_marker(target: Path) -> dict | None:
    path = target / "detectron2" / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def constraints_file() -> Path | None:
    """The repository's ``constraints.txt`` when this package is used from a checkout."""
    path = Path(__file__).resolve().parents[2] / "constraints.txt"
    return path if path.is_file() else None


def _pip(args: Sequence[str], debug: bool) -> None:
    command = [sys.executable, "-m", "pip", *args]
    if debug:
        _say("running " + " ".join(command))
    result = subprocess.run(command, capture_output=not debug, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout or "").strip().splitlines()[-3:] if not debug else []
        raise UserError(f"pip {args[0]} failed (exit {result.returncode}): {' | '.join(tail) or 'see output above'}")


def install_requirements(debug: bool = False) -> None:
    args = ["install", "--disable-pip-version-check", *requirements()]
    constraints = constraints_file()
    if constraints is not None:
        args += ["-c", str(constraints)]
    _say("installing Detectron2's Python requirements" + (f" (pinned by {constraints.name})" if constraints else ""))
    _pip(args, debug)


def download_archive(folder: Path, debug: bool = False) -> Path:
    """``pip download`` the source archive into ``folder``; return its path."""
    _say(f"downloading {ARCHIVE_REQUIREMENT} (source archive)")
    try:
        import torch  # noqa: F401  (the archive's setup.py imports it while pip reads metadata)
    except ImportError as exc:
        raise UserError("install torch first: the Detectron2 source archive's setup.py imports it") from exc
    _pip(
        [
            "download",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--no-build-isolation",
            "-d",
            str(folder),
            ARCHIVE_REQUIREMENT,
        ],
        debug,
    )
    archives = sorted(folder.glob("*.tar.gz")) + sorted(folder.glob("*.zip"))
    if not archives:
        raise UserError(f"pip download of {ARCHIVE_REQUIREMENT} produced no source archive")
    return archives[0]


def check_hash(archive: Path, expected: str = ARCHIVE_SHA256) -> None:
    actual = sha256_file(archive)
    if actual != expected:
        raise UserError(
            f"{archive.name}: SHA-256 {actual} does not match the pinned {expected}; refusing to install "
            f"(the package index served a different file than the one this project checked)"
        )


def extract_tree(archive: Path, folder: Path) -> Path:
    """Extract ``archive`` into ``folder``; return its ``detectron2/`` package folder."""
    with tarfile.open(archive, "r:*") as tar:
        tar.extractall(folder, filter="data")
    found = sorted(p for p in folder.glob("*/detectron2") if (p / "__init__.py").is_file())
    if not found:
        raise UserError(f"{archive.name}: no detectron2/ package inside the archive")
    return found[0]


def place_tree(tree: Path, target: Path, source: dict) -> Path:
    """Copy ``tree`` to ``target/detectron2`` atomically: copy beside it, then rename.

    An existing ``detectron2/`` is moved aside first and removed only after the new one is in place.
    """
    target.mkdir(parents=True, exist_ok=True)
    final = target / "detectron2"
    staging = Path(tempfile.mkdtemp(prefix=".detectron2-new-", dir=target))
    old = None
    try:
        staged = staging / "detectron2"
        shutil.copytree(tree, staged)
        (staged / MARKER).write_text(json.dumps(source, indent=1, sort_keys=True) + "\n")
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=".detectron2-old-", dir=target)) / "detectron2"
            os.rename(final, old)
        os.rename(staged, final)
    except BaseException:
        if old is not None and not final.exists():
            os.rename(old, final)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
    return final


def install_from_archive(archive: Path, target: Path, expected_sha256: str = ARCHIVE_SHA256) -> Path:
    """Hash-check ``archive`` and place its ``detectron2/`` tree under ``target``."""
    check_hash(archive, expected_sha256)
    _say(f"SHA-256 ok ({expected_sha256[:12]}...)")
    with tempfile.TemporaryDirectory(prefix="d2-extract-") as tmp:
        tree = extract_tree(archive, Path(tmp))
        source = {
            "archive": ARCHIVE_REQUIREMENT,
            "sha256": expected_sha256,
            "version": DETECTRON2_VERSION,
            "compiled_ops": False,
        }
        final = place_tree(tree, target, source)
    _say(f"installed the Detectron2 {DETECTRON2_VERSION} Python tree into {final}")
    return final


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transfer.d2.install",
        description="Install Detectron2 v0.6 (Python tree, hash-checked) where it cannot be built; "
        "does nothing when Detectron2 with compiled ops is importable.",
    )
    parser.add_argument("--force", action="store_true", help="reinstall even if our Detectron2 tree is present")
    parser.add_argument("--archive", type=Path, help="install from this local source archive instead of downloading")
    parser.add_argument("--skip-requirements", action="store_true", help="do not pip-install the Python requirements")
    parser.add_argument("--target", type=Path, help="site-packages folder to install into (default: this Python's)")
    add_common_flags(parser)
    args = parser.parse_args(argv)
    target = args.target or site_packages()

    state = probe() if args.target is None else "absent"
    if state == "compiled":
        _say("Detectron2 with compiled ops is already importable; nothing to do")
        return 0
    marker = installed_marker(target)
    if marker and marker.get("sha256") == ARCHIVE_SHA256 and not args.force:
        _say(
            f"Detectron2 {marker.get('version')} Python tree already installed in {target}; nothing to do "
            f"(--force to reinstall)"
        )
        return 0
    if state == "python-only" and marker is None and not args.force:
        _say("a Detectron2 without compiled ops is installed (not by this tool); leaving it (--force to replace)")
        return 0

    if not args.skip_requirements:
        install_requirements(args.debug)
    if args.archive is not None:
        if not args.archive.is_file():
            raise UserError(f"{args.archive}: no such archive")
        install_from_archive(args.archive, target)
    else:
        with tempfile.TemporaryDirectory(prefix="d2-download-") as tmp:
            install_from_archive(download_archive(Path(tmp), args.debug), target)
    _say("done; transfer.d2.compat supplies stand-ins for the missing compiled ops")
    return 0


def cli() -> None:
    """Console-script entry point (``ringbench-install-detectron2``)."""
    sys.exit(run_main(main))


if __name__ == "__main__":
    cli()
