"""Sweeps of a task with a grid: one job per card and grid point, then the task's own job, expanded, skipped,
recorded in ``jobs.json``, ordered by the local scheduler and chained on Slurm. No task of the suite has a grid
yet, so a test-only one (``grid_toy``: linear_synthetic whose points are its ``--linear-grid`` values) is
registered for each test; the schedulers run fake jobs (no process, no Slurm)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ringbench.cli import run_main
from ringbench.errors import UserError
from sweep import cli
from sweep import expand as expand_module
from sweep.expand import Job, expand, mark_existing
from sweep.jobs import read_status, status_file, write_status
from sweep.plan import Layout, Resources, load_plan
from sweep.schedule import Sweep

PLAN = "backbones: [{path: 'cards/*.pth'}]\ntasks:\n  grid_toy: {linear_grid: '0.1,1'}\n  linear_synthetic: {}\n"


@pytest.fixture
def grid_task(monkeypatch):
    """``grid_toy`` in the task registry for one test (removed afterwards)."""
    from transfer import tasks

    def points(config: dict[str, Any]) -> list[str]:
        return [f"c{v:g}" for v in config["grid"]]

    toy = dataclasses.replace(tasks.get_task("linear_synthetic"), name="grid_toy", grid_points=points)
    monkeypatch.setitem(tasks._REGISTRY, "grid_toy", toy)
    return toy


@pytest.fixture
def work(tmp_path: Path, grid_task) -> Path:
    """A workdir with two (dummy) cards, plain.pth and ring.pth, and the plan :data:`PLAN`."""
    (tmp_path / "cards").mkdir()
    for name in ("plain", "ring"):
        (tmp_path / "cards" / f"{name}.pth").write_bytes(name.encode())
    (tmp_path / "plan.yaml").write_text(PLAN)
    return tmp_path


def _layout(work: Path) -> Layout:
    return Layout(work, work / "results", work / "sweeps" / "plan")


def _expand(work: Path, text: str = PLAN) -> list[Job]:
    (work / "plan.yaml").write_text(text)
    return expand(load_plan(work / "plan.yaml"), _layout(work), "cpu")


def test_a_grid_task_is_its_point_jobs_then_its_own_job(work, monkeypatch):
    """Per card: one job per point (``--grid-point``, the task job's argv, resources and card dependency), then
    the task's job after them; the plan's flags narrow the grid; config and grid are asked once per task."""
    asked: list[str] = []
    for name in ("task_config", "task_grid_points"):
        real = getattr(expand_module, name)
        monkeypatch.setattr(expand_module, name, lambda task, flags, real=real: asked.append(task) or real(task, flags))
    jobs = _expand(work)
    assert sorted(asked) == ["grid_toy", "grid_toy", "linear_synthetic", "linear_synthetic"]
    assert [j.key for j in jobs] == [
        "grid_toy/plain/c0.1",
        "grid_toy/plain/c1",
        "grid_toy/plain",
        "grid_toy/ring/c0.1",
        "grid_toy/ring/c1",
        "grid_toy/ring",
        "linear_synthetic/plain",
        "linear_synthetic/ring",
    ]
    point, task_job = jobs[3], jobs[5]
    assert point.argv == [*task_job.argv, "--grid-point", "c0.1"] and point.grid_point == "c0.1"
    assert task_job.after == ["grid_toy/ring/c0.1", "grid_toy/ring/c1"] and task_job.grid_point is None
    assert point.after == [] and point.resources == task_job.resources and point.config_hash == task_job.config_hash
    assert all(not j.after for j in jobs[6:])
    recipe = "pretrain_args: [--data, synthetic, --profile, demo]\nbackbones: [{name: r, config: moco}]\n"
    jobs = _expand(work, recipe + "tasks: {grid_toy: {linear_grid: '0.5'}}")
    assert [(j.key, j.depends_on, j.after) for j in jobs] == [
        ("pretrain/r", None, []),
        ("grid_toy/r/c0.5", "pretrain/r", []),
        ("grid_toy/r", "pretrain/r", ["grid_toy/r/c0.5"]),
    ]


@pytest.mark.parametrize(
    "points,match",
    [
        (["a", "a"], r"grid_toy: its grid points must be distinct names .* \['a', 'a'\]"),
        (["ok", "a/b"], r"\['a/b'\]"),
        ([""], r"\[''\]"),
    ],
)
def test_bad_grid_points_are_one_line(work, grid_task, monkeypatch, points, match):
    monkeypatch.setattr(grid_task, "grid_points", lambda config: points)
    with pytest.raises(UserError, match=match):
        _expand(work)


def test_keys_sharing_a_state_file_are_refused(work):
    (work / "cards" / "ring__c1.pth").write_bytes(b"x")  # grid_toy/ring/c1 and grid_toy/ring__c1: one state file
    with pytest.raises(UserError, match=r"jobs \['grid_toy/ring/c1', 'grid_toy/ring__c1'\] would share one state"):
        _expand(work)


def test_point_jobs_are_skipped_with_their_tasks_record(work, monkeypatch):
    """A task's record there: its point jobs are not run either (the lookup made once per record); --force runs
    them all again, and the task's job then reuses the points its point jobs just made (--keep-grid-points)."""
    from ringbench import store

    ring = expand_module.card_sha256(work / "cards" / "ring.pth")
    lookups: list[tuple[str, str]] = []

    def find_record(results, sha, task, digest):
        lookups.append((sha, task))
        return {"task": task} if sha == ring and task == "grid_toy" else None

    monkeypatch.setattr(store, "find_record", find_record)
    jobs = _expand(work)
    mark_existing(jobs, _layout(work).results)
    assert {j.key: j.skip_reason for j in jobs if j.skip_reason} == {
        k: "record exists" for k in ("grid_toy/ring/c0.1", "grid_toy/ring/c1", "grid_toy/ring")
    }
    assert len(lookups) == len(set(lookups)) == 4  # two cards x two tasks
    jobs = _expand(work)
    mark_existing(jobs, _layout(work).results, force=True)
    assert not any(j.skip_reason for j in jobs) and jobs[0].argv[-3:] == ["--grid-point", "c0.1", "--force"]
    task_job = next(j for j in jobs if j.key == "grid_toy/ring")
    assert task_job.argv[-2:] == ["--force", "--keep-grid-points"]
    assert "--keep-grid-points" not in jobs[0].argv


def test_dry_run_lists_point_jobs(work, capsys):
    argv = ["--plan", str(work / "plan.yaml"), "--workdir", str(work), "--executor", "local", "--dry-run"]
    assert run_main(cli.main, argv) == 0
    out = capsys.readouterr().out
    assert out.count(" submit ") == 8 and "grid_toy/plain/c0.1" in out and "--grid-point c1" in out
    assert "2 grid point job(s)" in out


def test_jobs_file_keeps_the_grid_and_refuses_a_damaged_after(work, capsys):
    from sweep.status import read_jobs_file, status_rows

    layout = _layout(work)
    layout.status_dir.mkdir(parents=True)
    jobs = _expand(work)
    Sweep(jobs, layout, {}, "local", "plan").save()
    path = layout.sweep_dir / "jobs.json"
    entries = {e["key"]: e for e in read_jobs_file(path)["jobs"]}
    assert entries["grid_toy/plain"]["after"] == ["grid_toy/plain/c0.1", "grid_toy/plain/c1"]
    assert entries["grid_toy/plain/c1"]["grid_point"] == "c1" and entries["linear_synthetic/ring"]["after"] == []
    write_status(status_file(layout, "grid_toy/plain/c1"), "failed", error="exit 2: boom")
    rows = {r[0]: r for r in status_rows(layout)}
    assert rows["grid_toy/plain/c1"][1] == "failed" and rows["grid_toy/plain/c1"][5] == "exit 2: boom"
    assert rows["grid_toy/ring/c0.1"][1] == "not submitted"
    data = json.loads(path.read_text())
    argv = ["--plan", str(work / "plan.yaml"), "--workdir", str(work), "--status"]
    for bad in ("grid_toy/plain/c1", [3], [None], {"k": 1}):
        data["jobs"][2]["after"] = bad
        path.write_text(json.dumps(data))
        with pytest.raises(UserError, match="damaged, not a sweep's list of jobs"):
            read_jobs_file(path)
        assert run_main(cli.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {path}: damaged"), err


# --- the schedulers, with fake jobs ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Paths:
    stdout: Path


@dataclasses.dataclass
class _Handle:
    """A submitted job as the schedulers read it: an id, a log, no process (it has ended)."""

    job_id: str
    paths: _Paths


def _grid_jobs(card: Path) -> list[Job]:
    """A pretraining job, then per card (its own and an existing one) two grid points and the task's job."""
    res = Resources()
    jobs = [Job("pretrain/r", "pretrain", [], str(card), res)]
    for stem, maker in (("r", "pretrain/r"), ("old", None)):
        points = [f"t/{stem}/{p}" for p in ("a", "b")]
        jobs += [Job(k, "transfer", ["--grid-point", k[-1]], str(card), res, maker) for k in points]
        jobs.append(Job(f"t/{stem}", "transfer", [], str(card), res, maker, after=points))
    return jobs


def _local_sweep(tmp_path: Path, fail: set[str], parallel: int) -> tuple[Sweep, list[str]]:
    """A local sweep of :func:`_grid_jobs` whose submissions end at once: failed for the keys in ``fail``."""
    layout = _layout(tmp_path)
    layout.status_dir.mkdir(parents=True, exist_ok=True)
    order: list[str] = []
    sweep = Sweep(_grid_jobs(tmp_path / "r.pth"), layout, {}, "local", "plan", parallel=parallel, poll_s=0)

    def submit(job: Job) -> _Handle:
        order.append(job.key)
        write_status(status_file(layout, job.key), "failed" if job.key in fail else "done", key=job.key)
        sweep.handles[job.key] = _Handle(str(len(order)), _Paths(tmp_path / "log"))
        return sweep.handles[job.key]

    sweep.submit = submit
    return sweep, order


def test_local_scheduler_runs_a_tasks_job_after_its_points(tmp_path):
    sweep, order = _local_sweep(tmp_path, set(), parallel=1)
    sweep.run_local(progress=False)
    assert order == ["pretrain/r", "t/r/a", "t/r/b", "t/r", "t/old/a", "t/old/b", "t/old"]
    sweep, order = _local_sweep(tmp_path, set(), parallel=3)
    sweep.run_local(progress=False)
    assert order[0] == "pretrain/r" and set(sweep.states.values()) == {"done"}
    assert all(order.index(f"t/{c}") > order.index(f"t/{c}/{p}") for c in ("r", "old") for p in "ab")


def test_local_scheduler_cancels_a_tasks_job_when_a_point_fails(tmp_path):
    sweep, order = _local_sweep(tmp_path, {"t/old/b"}, parallel=2)
    sweep.run_local(progress=False)
    assert "t/old" not in order and sweep.states["t/old"] == "cancelled" and sweep.states["t/r"] == "done"
    assert sweep.notes["t/old"] == "its grid point job t/old/b failed"
    assert "t/old (its grid point job t/old/b failed)" in sweep.failures()
    status = read_status(status_file(sweep.layout, "t/old"))  # --status and --retry-failed see it
    assert status["state"] == "cancelled" and status["error"] == "its grid point job t/old/b failed"
    sweep, order = _local_sweep(tmp_path, {"pretrain/r"}, parallel=1)
    sweep.run_local(progress=False)
    assert sweep.notes["t/r/a"] == sweep.notes["t/r"] == "no card: its job pretrain/r did not make it"


class _FakeSlurm:
    """``make_executor`` on Slurm, recording each array: its name, its parameters and its members."""

    arrays: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, name: str, folder: Path) -> None:
        self.array = {"name": name, "params": {}, "keys": []}
        self.folder = folder
        _FakeSlurm.arrays.append(self.array)

    def update_parameters(self, **params: Any) -> None:
        self.array["params"].update(params)

    @contextlib.contextmanager
    def batch(self):
        yield

    def submit(self, job: Any) -> _Handle:
        self.array["keys"].append(job.key)
        return _Handle(f"{100 + len(_FakeSlurm.arrays)}_{len(self.array['keys']) - 1}", _Paths(self.folder))


def test_slurm_task_job_waits_for_its_point_jobs_array_tasks(tmp_path, monkeypatch):
    """Point jobs go in arrays before their task's jobs; a task job's array waits (``afterok``) for its card's
    pretraining job and each of its point jobs, named by array task id; skipped jobs are not waited for."""
    from sweep import schedule

    layout = _layout(tmp_path)
    layout.status_dir.mkdir(parents=True)
    _FakeSlurm.arrays = []
    monkeypatch.setattr(schedule, "make_executor", lambda kind, layout, res, plan, name: _FakeSlurm(name, tmp_path))
    jobs = _grid_jobs(tmp_path / "r.pth")
    jobs[4].skip_reason = "not failed"  # t/old/a
    sweep = Sweep(jobs, layout, {}, "slurm", "plan")
    sweep.run_slurm()
    arrays = [(a["keys"], a["params"].get("slurm_additional_parameters")) for a in _FakeSlurm.arrays]

    def after(*ids: str) -> dict[str, str]:
        return {"dependency": "afterok:" + ":".join(ids), "kill-on-invalid-dep": "yes"}

    assert arrays == [
        (["pretrain/r"], None),
        (["t/r/a", "t/r/b"], after("101_0")),
        (["t/r"], after("101_0", "102_0", "102_1")),
        (["t/old/b"], None),
        (["t/old"], after("104_0")),
    ]
    saved = json.loads((layout.sweep_dir / "jobs.json").read_text())["jobs"]
    assert {e["key"]: e["job_id"] for e in saved}["t/r"] == "103_0" and saved[6]["after"] == ["t/old/a", "t/old/b"]
    # the task job's point failed: Slurm removes it unstarted (kill-on-invalid-dep); waiting says so, --status too
    from sweep import status as status_module

    monkeypatch.setattr(schedule, "squeue_states", dict)
    monkeypatch.setattr(status_module, "squeue_states", dict)
    for key in ("pretrain/r", "t/r/a", "t/r/b", "t/r", "t/old/b"):
        write_status(status_file(layout, key), "failed" if key == "t/old/b" else "done")
    sweep.wait(progress=False, poll_s=0, gone_s=0)
    assert sweep.states["t/old"] == "cancelled" and "without starting" in sweep.notes["t/old"]
    row = next(r for r in status_module.status_rows(layout) if r[0] == "t/old")
    assert row[1] == "cancelled" and "a job it waits for failed" in row[5]
