"""transfer/run.py as a user runs it: help, task list, and one-line errors with exit code 2."""

from __future__ import annotations

import pytest

from tests.helpers import run_cli, write_card


def test_help_explains():
    out = run_cli("transfer/run.py", "--help")
    assert out.returncode == 0 and "--backbone" in out.stdout and "--force" in out.stdout


@pytest.mark.parametrize(
    "make_file, message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_text("not a checkpoint"), "not a PyTorch checkpoint"),
        (lambda p: p.write_bytes(b""), "empty file"),
    ],
)
def test_bad_backbone_file(tmp_path, make_file, message):
    path = tmp_path / "x.pth"
    make_file(path)
    out = run_cli("transfer/run.py", "--backbone", str(path), "--task", _any_task(), "--results", str(tmp_path / "r"))
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists(), "nothing written on bad input"


def test_unknown_task_lists_tasks(tmp_path):
    card = write_card(tmp_path / "c.pth")
    out = run_cli("transfer/run.py", "--backbone", str(card), "--task", "no_such_task")
    assert out.returncode == 2 and "unknown task 'no_such_task'" in out.stderr and "available:" in out.stderr


def test_debug_shows_traceback(tmp_path):
    out = run_cli("-m", "transfer.run", "--backbone", str(tmp_path / "missing.pth"), "--task", "x", "--debug")
    assert out.returncode != 0 and "Traceback" in out.stderr


def _any_task() -> str:
    from transfer.tasks import all_tasks

    return next(iter(all_tasks()), "fewshot_digits")
