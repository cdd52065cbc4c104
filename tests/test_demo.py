"""The main job (``make demo``: ``transfer/sweep.py --plan demo --executor local``): a recipe's card on
disk is reused when it was made with the config the plan resolves to and retrained otherwise, each
record is made once, and the shipped plans resolve. Most tests run the jobs in this process through
submitit's debug executor; one slow test runs the commands as a user does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ringbench.card import load_card
from ringbench.cli import run_main
from ringbench.store import load_records
from sweep import cli
from sweep.expand import expand
from sweep.plan import Layout, load_plan
from tests.helpers import REPO, run_cli, write_card

TINY_TASK = {
    "episodes": 20,
    "max_images_per_class": 12,
    "shots": 2,
    "queries": 5,
    "weight_decay": 0.01,
}
TINY_PRETRAIN = [
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
]


def _plan(tmp_path: Path, pretrain_args: list[str]) -> Path:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        yaml.safe_dump(
            {
                "pretrain_args": pretrain_args,
                "backbones": [{"name": "tiny", "config": "moco"}],
                "tasks": {"fewshot_digits": TINY_TASK},
            }
        )
    )
    return plan


def _plan_config(pretrain_args: list[str], config: str = "moco") -> dict:
    from pretrain.run import build_parser, resolve_config

    args = build_parser().parse_args(["--config", config, *pretrain_args])
    return json.loads(json.dumps(resolve_config(args)))


def _sweep(*argv: str, capsys) -> tuple[int, str, str]:
    code = run_main(cli.main, list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_card_made_with_the_plans_config_is_reused_and_each_record_made_once(tmp_path, capsys):
    work = tmp_path / "work"
    args = ["--data", "synthetic", "--profile", "demo"]
    write_card(work / "cards" / "tiny.pth", seed=0, config=_plan_config(args))
    argv = ["--plan", str(_plan(tmp_path, args)), "--workdir", str(work), "--device", "cpu", "--executor", "debug"]
    code, out, err = _sweep(*argv, capsys=capsys)
    assert code == 0, err[-2000:]
    assert "2 jobs, 1 to run, 1 done already" in err and "fewshot_digits/tiny: done" in err
    assert "| tiny " in out and "fewshot_digits acc" in out
    board = work / "sweeps" / "plan"
    assert "| tiny " in (board / "leaderboard.md").read_text()
    assert (board / "leaderboard.html").read_text().startswith("<!DOCTYPE html>")
    code, out, err = _sweep(*argv, capsys=capsys)
    assert code == 0 and "0 to run, 2 done already" in err
    assert len(load_records(work / "results")) == 1


def test_card_made_with_another_config_is_trained_again(tmp_path, capsys):
    """The plan, a config file or the demo profile changed since the card was made: it is trained again
    from scratch (--fresh: its checkpoints are stale too), not reused."""
    work = tmp_path / "work"
    stale = _plan_config(TINY_PRETRAIN)
    stale["loss"]["w_outer"] = 0.2
    write_card(work / "cards" / "tiny.pth", seed=0, config=stale)
    argv = ["--plan", str(_plan(tmp_path, TINY_PRETRAIN)), "--workdir", str(work), "--device", "cpu"]
    code, out, err = _sweep(*argv, "--executor", "debug", "--dry-run", capsys=capsys)
    assert code == 0 and "--fresh" in out  # the pretraining job starts from scratch
    code, out, err = _sweep(*argv, "--executor", "debug", "--no-table", capsys=capsys)
    assert code == 0, err[-2000:]
    assert "2 to run" in err and "pretrain/tiny: done" in err
    assert load_card(work / "cards" / "tiny.pth").meta["config"] == _plan_config(TINY_PRETRAIN)


@pytest.mark.slow
def test_demo_plan_as_a_user_runs_it(tmp_path):
    """``python transfer/sweep.py`` by path with the local executor: every job its own process."""
    work = tmp_path / "work"
    argv = ["--plan", str(_plan(tmp_path, TINY_PRETRAIN)), "--workdir", str(work), "--executor", "local"]
    first = run_cli("transfer/sweep.py", *argv, "--device", "cpu", "--jobs", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "| tiny " in first.stdout and load_card(work / "cards" / "tiny.pth").meta["epochs"] == 1
    again = run_cli("transfer/sweep.py", *argv, "--device", "cpu")
    assert again.returncode == 0 and "0 to run, 2 done already" in again.stderr
    assert len(load_records(work / "results")) == 1


EMBEDDED_PLANS = sorted(
    [*(REPO / "configs" / "sweeps").glob("demo*.yaml"), REPO / "configs/sweeps/transfer_suite_quick.yaml"]
)


@pytest.mark.parametrize("plan", EMBEDDED_PLANS, ids=lambda p: p.name)
def test_shipped_demo_plans_resolve(plan, tmp_path):
    """Every shipped plan on the embedded data (the demos, the quick transfer suite) expands: its configs resolve
    with its flags, its tasks exist and need no data."""
    from transfer.tasks import all_tasks

    spec = load_plan(plan)
    layout = Layout(tmp_path, tmp_path / "results", tmp_path / "sweeps" / plan.stem)
    jobs = expand(spec, layout, "cpu")
    pretrain = [j for j in jobs if j.stage == "pretrain"]
    assert len(pretrain) == sum(len(b["seeds"] or [None]) for b in spec["backbones"]) >= 2
    from pretrain.run import build_parser, resolve_config

    for job in pretrain:  # the pretraining command each job runs resolves to a config on the embedded data
        assert resolve_config(build_parser().parse_args(job.argv))["data"]["name"] == "synthetic"
    tasks = all_tasks()
    assert spec["tasks"] and not any(tasks[name].needs_data for name in spec["tasks"])
    points = sum(1 for j in jobs if j.grid_point)  # a grid task's points are jobs of their own, before its job
    assert len(jobs) == len(pretrain) * (1 + len(spec["tasks"])) + points
    assert points == (6 if plan.name == "transfer_suite_quick.yaml" else 0)  # 3 cards x finetune's 2 points


def test_shipped_example_plan_lists_its_jobs(tmp_path, capsys):
    write_card(tmp_path / "cards" / "mine.pth")
    code, out, err = _sweep(
        "--plan", "example", "--workdir", str(tmp_path), "--executor", "local", "--dry-run", capsys=capsys
    )
    assert code == 0, err
    assert "pretrain/ring_moco_r50_s2" in out and "voc_det/mine" in out and "8 GPU, 32 CPU, 128 GB, 600 min" in out


def test_sweep_help_by_path():
    out = run_cli("transfer/sweep.py", "--help")
    assert out.returncode == 0 and "--executor" in out.stdout and "--retry-failed" in out.stdout


@pytest.mark.heavy
def test_demo_plan_has_reference_rows_and_seed_replicates(tmp_path):
    """The main job's table ranks: it has the random and supervised rows, a ring/plain pair with at least
    three pretraining seeds each, paired seed by seed, and a random row of its own seeds (compared unpaired)."""
    from pretrain.run import build_parser, resolve_config

    spec = load_plan(REPO / "configs" / "sweeps" / "demo.yaml")
    jobs = expand(spec, Layout(tmp_path, tmp_path / "results", tmp_path / "sweeps"), "cpu")
    seeds: dict[tuple[str, str], set[int]] = {}
    for job in jobs:
        if job.stage == "pretrain":
            cfg = resolve_config(build_parser().parse_args(job.argv))
            seeds.setdefault((cfg["method"], cfg["loss"]["name"]), set()).add(cfg["train"]["seed"])
    assert ("random", "none") in seeds and ("supervised", "ce") in seeds
    assert len(seeds[("moco", "nce")]) >= 3 and seeds[("moco", "ring")] == seeds[("moco", "nce")]
    trained = set().union(*(s for key, s in seeds.items() if key != ("random", "none")))
    assert len(seeds[("random", "none")]) >= 3 and not seeds[("random", "none")] & trained
