"""Sweeps: plans expanded into jobs and checked before anything is submitted; the local executor
runs a 2-card x 2-task sweep of embedded tasks, and a second run submits nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ringbench.cli import run_main
from ringbench.errors import UserError
from sweep import cli
from sweep.expand import Job, expand, flag_argv
from sweep.plan import Layout, load_plan
from tests.helpers import REPO, write_card

TINY_FEWSHOT = "  fewshot_digits: {episodes: 6, max_images_per_class: 12, shots: 2, queries: 3}\n"
TINY_LINEAR = "  linear_synthetic: {linear_synthetic_classes: 3, linear_synthetic_train: 4, linear_synthetic_test: 2}\n"
TINY_TASKS = "\ntasks:\n" + TINY_FEWSHOT + TINY_LINEAR


def _plan(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return path


def _layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path, tmp_path / "results", tmp_path / "sweeps" / "plan")


def _jobs(tmp_path: Path, text: str, **kwargs) -> list[Job]:
    return expand(load_plan(_plan(tmp_path, text)), _layout(tmp_path), "cpu", **kwargs)


@pytest.fixture(scope="module")
def cards_dir(tmp_path_factory) -> Path:
    """A workdir holding cards/plain.pth and cards/ring.pth, shared by the tests that only expand plans."""
    work = tmp_path_factory.mktemp("work")
    for i, name in enumerate(("plain", "ring")):
        write_card(work / "cards" / f"{name}.pth", seed=i)
    return work


@pytest.fixture
def two_cards(tmp_path: Path, cards_dir: Path) -> list[Path]:
    """Cards cards/plain.pth and cards/ring.pth in ``tmp_path`` (links to the shared ones)."""
    (tmp_path / "cards").mkdir()
    for card in sorted((cards_dir / "cards").glob("*.pth")):
        (tmp_path / "cards" / card.name).symlink_to(card)
    return sorted((tmp_path / "cards").glob("*.pth"))


def test_recipes_make_one_card_per_seed_and_transfer_jobs_wait_for_them(tmp_path, two_cards):
    text = """
pretrain_args: [--data, synthetic, --profile, demo]
backbones:
  - {path: "cards/*.pth"}
  - {name: rmoco, config: moco_ring, seeds: [0, 2], args: [--epochs, "1"], resources: {cpus: 4}}
  - {name: extra, config: moco, optional: true}
tasks:
  fewshot_digits: {episodes: 30, resources: {gpus: 1, time_min: 10}}
"""
    jobs = _jobs(tmp_path, text, quick=True)
    keys = [j.key for j in jobs]
    assert keys == [
        "pretrain/rmoco_s0",
        "pretrain/rmoco_s2",
        "fewshot_digits/plain",
        "fewshot_digits/ring",
        "fewshot_digits/rmoco_s0",
        "fewshot_digits/rmoco_s2",
    ]
    pre = jobs[1]
    assert pre.argv[pre.argv.index("--seed") + 1] == "2" and pre.card == str(tmp_path / "cards" / "rmoco_s2.pth")
    assert pre.argv[pre.argv.index("--config") + 1].endswith("configs/pretrain/moco_ring.yaml")
    assert "--profile" in pre.argv and "--epochs" in pre.argv and pre.resources.cpus == 4
    transfer = jobs[-1]
    assert transfer.depends_on == "pretrain/rmoco_s2" and jobs[2].depends_on is None
    assert transfer.argv[transfer.argv.index("--episodes") + 1] == "30"
    assert transfer.resources.gpus == 1 and transfer.argv[transfer.argv.index("--device") + 1] == "cuda"
    assert len(_jobs(tmp_path, text)) == 8  # without --quick: the optional recipe and its transfer job too


@pytest.mark.parametrize(
    "text,match",
    [
        ("backbones: [{path: 'cards/*.pth'}]\ntasks: {no_such_task: {}}", r"unknown task\(s\) \['no_such_task'\]"),
        ("backbones: [{path: 'nothing/*.pth'}]\ntasks: {fewshot_digits: {}}", "matches no file"),
        ("backbones: [{path: 'cards/*.pth'}]\ntasks: {fewshot_digits: {episodes: many}}", "--episodes"),
        ("backbones: [{path: 'cards/*.pth'}]\ntasks: {fewshot_digits: {probe: magic}}", "--probe must be one of"),
        ("backbones: [{path: 'cards/*.pth'}]\ntasks: {fewshot_digits: {bogus_flag: 1}}", "unrecognized arguments"),
        (
            "backbones: [{path: 'cards/*.pth'}]\ntasks: {fewshot_digits: {resources: {gpus: -1}}}",
            "resources need gpus >= 0",
        ),
        (
            "backbones: [{path: 'cards/*.pth'}]\ntasks: {fewshot_digits: {resources: {gpu: 1}}}",
            "unknown config key 'gpu'",
        ),
        ("backbones: [{name: x}]\ntasks: {fewshot_digits: {}}", "needs a pretraining 'config'"),
        ("backbones: [{name: x, config: nonexistent}]\ntasks: {fewshot_digits: {}}", "config file not found"),
        ("backbones: [{name: ../x, config: moco}]\ntasks: {fewshot_digits: {}}", "may hold only letters"),
        ("backbones: [{path: 'cards/*.pth', name: x}]\ntasks: {fewshot_digits: {}}", "either 'path'"),
        ("backbones: []\ntasks: {fewshot_digits: {}}", "non-empty 'backbones'"),
        ("backbones: [{path: 'cards/*.pth'}]\ntasks: {fewshot_digits: {}}\nclustr: {}", "unknown config key 'clustr'"),
        (  # a key unknown inside a backbone entry: the entry's keys are listed, not the plan's
            "backbones: [{path: 'cards/*.pth', profile: demo}]\ntasks: {fewshot_digits: {}}",
            r"unknown config key 'profile'; known keys here: \['args', 'config', 'name', 'optional', 'path', "
            r"'resources', 'seeds'\]",
        ),
        (  # a recipe's pretraining arguments are checked at expansion, in one line
            "backbones: [{name: x, config: moco, args: [--bogus]}]\ntasks: {fewshot_digits: {}}",
            r"plan backbones\[0\]: unrecognized arguments: --bogus",
        ),
        (
            "backbones: [{name: x, config: moco, args: [loss.w_outr=1]}]\ntasks: {fewshot_digits: {}}",
            r"plan backbones\[0\]: override 'loss.w_outr=1': unknown config key",
        ),
        (  # another family's flag
            "backbones: [{path: 'cards/*.pth'}]\ntasks: {fewshot_digits: {seeds: 3}}",
            r"plan job fewshot_digits/plain: --seeds: not used by task fewshot_digits",
        ),
    ],
)
def test_bad_plans_are_one_clean_error(tmp_path, two_cards, text, match):
    with pytest.raises(UserError, match=match):
        _jobs(tmp_path, text)


def test_dry_run_lists_jobs_and_submits_nothing(tmp_path, two_cards, capsys):
    plan = _plan(tmp_path, "backbones: [{path: 'cards/*.pth'}]" + TINY_TASKS)
    argv = ["--plan", str(plan), "--workdir", str(tmp_path), "--executor", "local", "--dry-run"]
    assert run_main(cli.main, argv) == 0
    out = capsys.readouterr().out
    assert out.count("submit") == 4 and "linear_synthetic/ring" in out and "2 CPU, 8 GB, 120 min" in out
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "results").exists()


def run_two_by_two(
    tmp_path: Path, capsys, executor: str, *extra: str, tasks: tuple[str, ...] = ("fewshot_digits", "linear_synthetic")
) -> None:
    """Two cards x ``tasks`` (embedded) through ``executor``: each record written once, the plan's table printed; a
    second run submits nothing; ``--status`` shows every job done (shared with the Slurm test: both tasks)."""
    for i, name in enumerate(("plain", "ring")):
        write_card(tmp_path / "cards" / f"{name}.pth", seed=i)
    lines = {"fewshot_digits": TINY_FEWSHOT, "linear_synthetic": TINY_LINEAR}
    plan = _plan(tmp_path, "backbones: [{path: 'cards/*.pth'}]\ntasks:\n" + "".join(lines[t] for t in tasks))
    argv = ["--plan", str(plan), "--workdir", str(tmp_path), "--executor", executor, *extra]
    jobs = 2 * len(tasks)
    assert run_main(cli.main, argv) == 0
    out, err = capsys.readouterr()
    assert f"{jobs} to run, 0 done already; executor {executor}" in err and f"[{jobs}/{jobs}]" in err
    for name in ("plain", "ring"):  # the plan's leaderboard: both cards, every task
        assert f"| {name} " in out
    assert all(f"{task} acc" in out for task in tasks)
    from ringbench.store import load_records

    records = load_records(tmp_path / "results")
    assert sorted((r["backbone"], r["task"]) for r in records) == sorted(
        (n, t) for n in ("plain", "ring") for t in tasks
    )
    status = json.loads((tmp_path / "sweeps" / "plan" / "status" / f"{tasks[0]}__ring.json").read_text())
    assert status["state"] == "done" and status["wall_s"] >= 0 and status["starts"] == 1

    assert run_main(cli.main, argv) == 0  # again: everything exists, nothing is submitted
    err = capsys.readouterr().err
    assert f"0 to run, {jobs} done already" in err and "running" not in err
    assert len(load_records(tmp_path / "results")) == jobs

    assert run_main(cli.main, [*argv[:4], "--status"]) == 0
    table = capsys.readouterr().out
    assert table.count("record exists") == jobs and "failed" not in table


@pytest.mark.heavy
def test_local_sweep_runs_each_job_once(tmp_path, capsys):
    """Two jobs at a time (the Slurm test runs the two-by-two plan; the demo tests a local sweep with pretraining)."""
    run_two_by_two(tmp_path, capsys, "local", "--jobs", "2", tasks=("fewshot_digits",))


@pytest.mark.slow  # the default suite runs the same path through a backgrounded shell (tests/test_guarantees.py)
def test_sigterm_to_a_local_sweep_stops_its_jobs(tmp_path):
    """``kill`` (SIGTERM) reaches only the sweep's process; the jobs it started end with it."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    plan = _plan(
        tmp_path,
        "pretrain_args: [--data, synthetic, --profile, demo]\n"
        "backbones: [{name: long, config: moco, seeds: [0], args: [--epochs, '200']}]\n" + TINY_TASKS,
    )
    argv = [
        sys.executable,
        "-m",
        "sweep",
        "--plan",
        str(plan),
        "--workdir",
        str(tmp_path),
        "--executor",
        "local",
    ]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(argv, cwd=root, stderr=subprocess.PIPE, text=True, start_new_session=True)
    status_path = tmp_path / "sweeps" / "plan" / "status" / "pretrain__long_s0.json"
    try:
        deadline = time.monotonic() + 120
        pid = None
        while pid is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if status_path.is_file():
                pid = json.loads(status_path.read_text() or "{}").get("pid")
        assert pid is not None, "the pretraining job never started"
        time.sleep(2)  # inside the stage's own code
        proc.send_signal(signal.SIGTERM)  # to the sweep's process only
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "pretrain/long_s0: cancelled (the sweep was interrupted)" in err
        for _ in range(50):  # the job's process is gone (not merely orphaned)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"job process {pid} still runs after its sweep was stopped")
        assert not (tmp_path / "cards" / "long_s0.pth").exists()
    finally:  # a failure leaves nothing running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_failing_job_is_reported_and_retried(tmp_path, capsys):
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "broken.pth").write_bytes(b"not a checkpoint")  # fails inside its job, not before
    plan = _plan(tmp_path, "backbones: [{path: 'cards/*.pth'}]\ntasks:\n" + TINY_FEWSHOT)
    argv = ["--plan", str(plan), "--workdir", str(tmp_path), "--executor", "debug", "--no-table"]
    assert run_main(cli.main, argv) == 2
    err = capsys.readouterr().err
    assert "fewshot_digits/broken: failed" in err and "1 job(s) failed: fewshot_digits/broken" in err
    assert run_main(cli.main, [*argv[:4], "--status"]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert row.startswith("fewshot_digits/broken") and " failed " in row and "exit 2" in row
    assert "not a PyTorch checkpoint" in err  # the job's own one-line error, in its output
    write_card(tmp_path / "cards" / "broken.pth", seed=3)  # repaired
    assert run_main(cli.main, [*argv, "--retry-failed"]) == 0
    err = capsys.readouterr().err
    assert "1 to run" in err and "fewshot_digits/broken: done" in err


def test_flags_from_plan_values():
    assert flag_argv({"episodes": 300, "eval_only": True, "weights": None, "force": False}) == [
        "--episodes",
        "300",
        "--eval-only",
    ]
    assert flag_argv({"pairs": [1, 2]}) == ["--pairs", "1", "2"]


def test_a_task_config_is_resolved_once_per_task_and_flags(tmp_path, two_cards, monkeypatch):
    """Every card of a task shares its config and hash, resolved once (not once per job), and the same one that
    ``transfer/run.py`` computes from its command line for the record's identity."""
    from ringbench.records import config_hash
    from sweep import expand as expand_module
    from transfer.resolve import task_config
    from transfer.run import build_parser
    from transfer.tasks import get_task

    calls = []

    def counted(task, flags=None):
        calls.append(task)
        return task_config(task, flags)

    monkeypatch.setattr(expand_module, "task_config", counted)
    jobs = _jobs(tmp_path, "backbones: [{path: 'cards/*.pth'}]" + TINY_TASKS)
    assert sorted(calls) == ["fewshot_digits", "linear_synthetic"] and len(jobs) == 4
    for job in jobs:
        args = build_parser().parse_args(job.argv)
        assert job.config_hash == config_hash(get_task(job.task).make_config(args))


def test_pretrain_recipe_questions(tmp_path):
    """A recipe resolves to the config its pretraining command trains with; a card is that run's result when
    its recorded config does not differ (None: no card)."""
    from pretrain.recipe import card_changes, recipe_config
    from pretrain.run import build_parser, resolve_config

    args = ["--data", "synthetic", "--profile", "demo", "loss.w_outer=0.5"]
    cfg = recipe_config("moco_ring", args, seed=3)
    assert cfg == resolve_config(build_parser().parse_args(["--config", "moco_ring", *args, "--seed", "3"]))
    assert cfg["train"]["seed"] == 3 and recipe_config("moco_ring", args)["train"]["seed"] != 3
    assert card_changes(tmp_path / "none.pth", cfg) is None
    with pytest.raises(UserError, match="unrecognized arguments: --nope"):
        recipe_config("moco_ring", ["--nope"])


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs" / "sweeps").glob("*.yaml")))
def test_every_shipped_plan_expands(tmp_path, two_cards, capsys, name):
    """The shipped plans (the demo, the example and zoo cluster plans) expand into jobs with their cards in place:
    every task, flag and resource they name is one the suite takes (``--dry-run``: nothing is submitted)."""
    (tmp_path / "zoo-cards").mkdir()
    (tmp_path / "zoo-cards" / "moco-v2.pth").symlink_to(two_cards[0])
    argv = ["--plan", name, "--workdir", str(tmp_path), "--executor", "local", "--dry-run", "--device", "cpu"]
    assert run_main(cli.main, argv) == 0
    assert " submit " in capsys.readouterr().out
