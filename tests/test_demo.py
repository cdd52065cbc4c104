"""The main job's orchestration: cards on disk are reused, transfer runs once, the leaderboard is written,
and a second run reuses every record."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from ringbench.card import load_card
from ringbench.cli import run_main
from ringbench.errors import UserError
from tests.helpers import REPO, run_cli, write_card
from transfer import demo
from transfer.results import load_records

TINY_TASK = {
    "name": "fewshot_digits",
    "args": [
        "--episodes",
        "20",
        "--max-images-per-class",
        "12",
        "--shots",
        "2",
        "--queries",
        "5",
        "--weight-decay",
        "0.01",
    ],
}


def _plan(tmp_path, pretrain_args: list[str]) -> Path:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "pretrain_args": pretrain_args,
                "backbones": [{"name": "tiny", "config": "configs/pretrain/moco.yaml"}],
                "tasks": [TINY_TASK],
            }
        )
    )
    return plan


def _plan_config(pretrain_args: list[str], config: str = "configs/pretrain/moco.yaml") -> dict:
    from pretrain.run import build_parser, resolve_config

    args = build_parser().parse_args(["--config", str(REPO / config), *pretrain_args])
    return json.loads(json.dumps(resolve_config(args)))


def _demo(*argv: str, capsys) -> tuple[int, str, str]:
    """``python -m transfer.demo argv`` with every stage run in this process: (exit code, stdout, stderr)."""
    code = run_main(lambda a: demo.main(a, in_process=True), list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _check_reuse(tmp_path, run) -> None:
    """A card on disk is reused, the task runs once, the leaderboard is written; a second demo reuses the
    record. ``run(*argv)`` runs the demo: (exit code, stdout, stderr)."""
    work = tmp_path / "work"
    args = ["--data", "synthetic", "--profile", "demo"]
    write_card(work / "cards" / "tiny.pth", seed=0, config=_plan_config(args))
    plan = _plan(tmp_path, args)
    code, out, err = run("--plan", str(plan), "--workdir", str(work), "--device", "cpu")
    assert code == 0, err[-2000:]
    assert "[pretrain tiny] reusing" in out and "[fewshot_digits tiny] done" in out
    board = (work / "results" / "leaderboard.md").read_text()
    assert "| tiny " in board and "fewshot_digits acc" in board
    assert (work / "results" / "leaderboard.html").read_text().startswith("<!DOCTYPE html>")
    code, out, err = run("--plan", str(plan), "--workdir", str(work), "--device", "cpu")
    assert code == 0 and "[fewshot_digits tiny] reusing its record" in out
    assert len(load_records(work / "results")) == 1


def test_demo_reuses_cards_and_records(tmp_path, capsys):
    _check_reuse(tmp_path, lambda *argv: _demo(*argv, capsys=capsys))


@pytest.mark.slow
def test_demo_reuses_cards_and_records_as_subprocesses(tmp_path):
    """The same as a user runs it: ``python -m transfer.demo``, each stage a ``python <script>`` process."""

    def run(*argv: str) -> tuple[int, str, str]:
        proc = run_cli("-m", "transfer.demo", *argv)
        return proc.returncode, proc.stdout, proc.stderr

    _check_reuse(tmp_path, run)


def test_demo_retrains_a_card_made_with_another_config(tmp_path, capsys):
    """A card whose recorded config is not what the plan would train now (the plan, a config file or
    the demo profile changed) is trained again from scratch, not reused."""
    work = tmp_path / "work"
    args = [
        "--data",
        "synthetic",
        "--profile",
        "demo",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--threads",
        "1",
        "data.synthetic_classes=4",
        "data.synthetic_images_per_class=8",
        "data.synthetic_image_size=16",
        "moco.queue_size=32",
        "knn.enabled=false",
        "--no-progress",
    ]
    stale = _plan_config(args)
    stale["loss"]["w_outer"] = 0.2
    write_card(work / "cards" / "tiny.pth", seed=0, config=stale)
    plan = _plan(tmp_path, args)
    code, out, err = _demo("--plan", str(plan), "--workdir", str(work), "--device", "cpu", capsys=capsys)
    assert code == 0, err[-2000:]
    assert "made with another config (differs in ['loss.w_outer'])" in out and "--fresh" in out
    assert load_card(work / "cards" / "tiny.pth").meta["config"] == _plan_config(args)


@pytest.mark.parametrize("plan", sorted((REPO / "configs").glob("demo*.yaml")), ids=lambda p: p.name)
def test_shipped_plans_resolve(plan):
    """Every shipped plan names configs that resolve with its flags and tasks that exist."""
    from transfer.demo import load_plan
    from transfer.tasks import all_tasks

    spec = load_plan(plan)
    for b in spec["backbones"]:
        cfg = _plan_config([*map(str, spec.get("pretrain_args", [])), *map(str, b.get("args", []))], b["config"])
        assert cfg["data"]["name"] == "synthetic"  # the plans run on the embedded data
    names = [t if isinstance(t, str) else t["name"] for t in spec["tasks"]]
    assert set(names) <= set(all_tasks()) and not any(all_tasks()[n].needs_data for n in names)


def test_demo_refuses_a_bad_plan(tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text("backbones: []\ntasks: [syn_det]\n")
    code, _, err = _demo("--plan", str(plan), "--workdir", str(tmp_path), capsys=capsys)
    assert code == 2 and "non-empty 'backbones'" in err and "Traceback" not in err


def test_a_stage_runs_by_path_in_a_subprocess_and_its_failure_stops_the_demo(tmp_path, capsys):
    """The subprocess path ``make demo`` takes: ``python transfer/leaderboard.py`` from the repository root;
    a stage's nonzero exit is a one-line error naming the step."""
    cmd = [sys.executable, "transfer/leaderboard.py", "--results", str(tmp_path / "missing")]
    with pytest.raises(UserError, match=r"leaderboard md failed \(exit 2\)"):
        demo._run(cmd, "leaderboard md")
    with pytest.raises(UserError, match=r"leaderboard md failed \(exit 2\)"):
        demo._run(cmd, "leaderboard md", in_process=True)
    assert "no such results" in capsys.readouterr().err  # the stage's own message, from the in-process run


def test_demo_help_as_a_module():
    """``python -m transfer.demo`` (what ``make demo`` runs) starts and explains itself."""
    out = run_cli("-m", "transfer.demo", "--help")
    assert out.returncode == 0 and "--quick" in out.stdout and "--workdir" in out.stdout
