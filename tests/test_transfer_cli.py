"""transfer/run.py as a user runs it: help (a real ``python transfer/run.py`` process), and, in-process,
the task list and one-line errors with exit code 2."""

from __future__ import annotations

import pytest

from ringbench.cli import run_main
from ringbench.errors import UserError
from tests.helpers import run_cli, write_card
from transfer.run import main


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
def test_bad_backbone_file(tmp_path, capsys, make_file, message):
    path = tmp_path / "x.pth"
    make_file(path)
    code = run_main(main, ["--backbone", str(path), "--task", _any_task(), "--results", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists(), "nothing written on bad input"


def test_unknown_task_lists_tasks(tmp_path, capsys):
    card = write_card(tmp_path / "c.pth")
    code = run_main(main, ["--backbone", str(card), "--task", "no_such_task"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown task 'no_such_task'" in err and "available:" in err


def test_debug_shows_traceback(tmp_path):
    """``--debug`` lets the error through (Python then prints its traceback and exits 1)."""
    with pytest.raises(UserError, match="unknown task 'x'"):
        run_main(main, ["--backbone", str(tmp_path / "missing.pth"), "--task", "x", "--debug"])


def _any_task() -> str:
    from transfer.tasks import all_tasks

    return next(iter(all_tasks()), "fewshot_digits")


def test_grid_point_needs_a_task_with_a_grid(tmp_path, capsys):
    card = write_card(tmp_path / "c.pth")
    argv = ["--backbone", str(card), "--task", "fewshot_digits", "--grid-point", "lr0.1", "--results", str(tmp_path)]
    code = run_main(main, argv)
    err = capsys.readouterr().err
    assert code == 2 and "--grid-point: task fewshot_digits searches no grid" in err
    assert not list(tmp_path.glob("fewshot_digits/*.json")), "nothing written on bad input"


def test_keep_grid_points_needs_a_task_with_a_grid(tmp_path, capsys):
    card = write_card(tmp_path / "c.pth")
    argv = ["--backbone", str(card), "--task", "fewshot_digits", "--keep-grid-points", "--results", str(tmp_path)]
    assert run_main(main, argv) == 2
    assert "--keep-grid-points: task fewshot_digits searches no grid" in capsys.readouterr().err
