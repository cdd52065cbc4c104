"""The Detectron2 installer: hash check, atomic placement, CLI errors (no network: local archives)."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

from ringbench.errors import UserError
from tests.helpers import run_cli
from transfer.d2 import install


def _archive(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"pb1-detectron2-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_wrong_hash_aborts_and_installs_nothing(tmp_path):
    archive = _archive(tmp_path / "pb1-detectron2-0.6.tar.gz", {"detectron2/__init__.py": "__version__ = '0.6'\n"})
    target = tmp_path / "site"
    target.mkdir()
    with pytest.raises(UserError, match="does not match the pinned"):
        install.install_from_archive(archive, target)
    assert list(target.iterdir()) == []


def test_cli_wrong_hash_exit_2_one_line(tmp_path):
    archive = _archive(tmp_path / "a.tar.gz", {"detectron2/__init__.py": ""})
    target = tmp_path / "site"
    proc = run_cli(
        "-m", "transfer.d2.install", "--archive", str(archive), "--target", str(target), "--skip-requirements"
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "SHA-256" in errors[0] and "refusing to install" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (target / "detectron2").exists()


def test_tree_is_placed_with_marker_and_replaces_old_copy(tmp_path):
    archive = _archive(
        tmp_path / "a.tar.gz",
        {
            "detectron2/__init__.py": "__version__ = '0.6'\n",
            "detectron2/layers/__init__.py": "X = 1\n",
            "setup.py": "raise SystemExit('not installed')\n",
        },
    )
    target = tmp_path / "site"
    (target / "detectron2").mkdir(parents=True)
    (target / "detectron2" / "stale.py").write_text("old")
    final = install.install_from_archive(archive, target, expected_sha256=_sha(archive))
    assert final == target / "detectron2"
    assert (final / "layers" / "__init__.py").read_text() == "X = 1\n"
    assert not (final / "stale.py").exists()
    assert not (target / "setup.py").exists()
    marker = json.loads((final / install.MARKER).read_text())
    assert marker["sha256"] == _sha(archive) and marker["version"] == "0.6"
    assert sorted(p.name for p in target.iterdir()) == ["detectron2"]  # no staging folders left


def test_archive_without_package_is_rejected(tmp_path):
    archive = _archive(tmp_path / "a.tar.gz", {"README.md": "nothing"})
    with pytest.raises(UserError, match="no detectron2/ package"):
        install.install_from_archive(archive, tmp_path / "site", expected_sha256=_sha(archive))


def test_second_run_is_a_no_op(tmp_path):
    target = tmp_path / "site"
    (target / "detectron2").mkdir(parents=True)
    (target / "detectron2" / install.MARKER).write_text(
        json.dumps({"sha256": install.ARCHIVE_SHA256, "version": "0.6"})
    )
    proc = run_cli("-m", "transfer.d2.install", "--target", str(target), "--skip-requirements")
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout


def test_help():
    proc = run_cli("-m", "transfer.d2.install", "--help")
    assert proc.returncode == 0 and "--archive" in proc.stdout and "--debug" in proc.stdout


def test_probe_reports_this_environment():
    import importlib.util

    present = importlib.util.find_spec("detectron2") is not None
    assert install.probe(sys.executable) in (("compiled", "python-only") if present else ("absent",))
