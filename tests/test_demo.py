"""The main job's orchestration: cards on disk are reused, transfer runs once, the leaderboard is written,
and a second run reuses every record."""

from __future__ import annotations

import yaml

from tests.helpers import run_cli, write_card


def test_demo_reuses_cards_and_records(tmp_path):
    work = tmp_path / "work"
    write_card(work / "cards" / "tiny.pth", seed=0)
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "pretrain_args": ["--data", "synthetic", "--profile", "demo"],
        "backbones": [{"name": "tiny", "config": "configs/pretrain/moco.yaml"}],
        "tasks": [{"name": "fewshot_digits", "args": ["--episodes", "20", "--max-images-per-class", "12",
                                                      "--shots", "2", "--queries", "5", "--weight-decay", "0.01"]}],
    }))
    first = run_cli("-m", "transfer.demo", "--plan", str(plan), "--workdir", str(work), "--device", "cpu")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "[pretrain tiny] reusing" in first.stdout and "[fewshot_digits tiny] done" in first.stdout
    board = (work / "results" / "leaderboard.md").read_text()
    assert "| tiny " in board and "fewshot_digits acc" in board
    assert (work / "results" / "leaderboard.html").read_text().startswith("<!DOCTYPE html>")
    second = run_cli("-m", "transfer.demo", "--plan", str(plan), "--workdir", str(work), "--device", "cpu")
    assert second.returncode == 0 and "[fewshot_digits tiny] reusing its record" in second.stdout
    assert len((work / "results" / "records.jsonl").read_text().splitlines()) == 1


def test_demo_refuses_a_bad_plan(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("backbones: []\ntasks: [syn_det]\n")
    out = run_cli("-m", "transfer.demo", "--plan", str(plan), "--workdir", str(tmp_path))
    assert out.returncode == 2 and "non-empty 'backbones'" in out.stderr and "Traceback" not in out.stderr
