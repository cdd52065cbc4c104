"""submitit on a real Slurm cluster (marker `cluster`; `make test-cluster` brings one up and down).

Not part of `make test`: the default `addopts` deselect the marker. Skipped when `sbatch` is not on PATH.
The jobs run this file's functions, so the worktree is put on the jobs' PYTHONPATH; the submitit folders
live in pytest's tmp_path, which slurmd reads and writes (root runs everything on the test machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import submitit

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(shutil.which("sbatch") is None, reason="no Slurm here: sbatch is not on PATH"),
]

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 150  # per test; each stays under 3 minutes


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout


def _partition() -> str:
    """The cluster's default partition (sinfo marks it with a '*'), else its first one."""
    names = _run("sinfo", "-h", "-o", "%P").split()
    if not names:
        pytest.fail("sinfo lists no partition: is the cluster up (bash tests/cluster/slurm_up.sh)?")
    default = [n for n in names if n.endswith("*")]
    return (default[0] if default else names[0]).rstrip("*")


def _executor(folder: Path, timeout_min: int = 3) -> Any:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        slurm_partition=_partition(),
        timeout_min=timeout_min,
        cpus_per_task=1,
        slurm_array_parallelism=2,
        slurm_setup=[f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"],
    )
    return executor


def _in_queue(job_ids: Iterable[str]) -> set[str]:
    """The job ids (array tasks as 12_0, or 12 while the array is pending) that squeue still lists."""
    ids = sorted({j.split("_")[0] for j in job_ids})
    out = subprocess.run(
        ["squeue", "-h", "-j", ",".join(ids), "-o", "%i"], capture_output=True, text=True, timeout=30
    ).stdout
    return set(out.split())


def _cancel(jobs: Sequence[Any]) -> None:
    ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
    subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


def _wait(jobs: Sequence[Any], timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Wait until every job has written its result; fail (after scancel) on timeout, or when a job has
    left the queue without a result. submitit alone would wait forever: without accounting storage
    `sacct` fails, so it only knows a job is done by its result file."""
    deadline = time.monotonic() + timeout_s
    gone_since: dict[str, float] = {}
    while True:
        pending = [j for j in jobs if not j.paths.result_pickle.exists()]
        if not pending:
            return
        if time.monotonic() > deadline:
            _cancel(jobs)
            pytest.fail(f"jobs {[j.job_id for j in pending]} not done after {timeout_s:.0f}s; queue:\n{_run('squeue')}")
        queued = _in_queue(j.job_id for j in pending)
        for job in pending:
            if str(job.job_id) in queued or str(job.job_id).split("_")[0] in queued:
                gone_since.pop(job.job_id, None)
                continue
            # Left the queue: give the result file a few seconds to appear, then report the job's stderr.
            first = gone_since.setdefault(job.job_id, time.monotonic())
            if time.monotonic() - first > 10 and not job.paths.result_pickle.exists():
                _cancel(jobs)
                pytest.fail(f"job {job.job_id} left the queue without a result; stderr:\n{job.stderr()}")
        time.sleep(1)


# --- the jobs' functions (imported by the jobs from this module) ---


def _square(x: int) -> dict[str, Any]:
    return {
        "x": x,
        "square": x * x,
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"),
    }


class StartsTwice(submitit.helpers.Checkpointable):
    """Logs each start to `marker`; the first run sleeps until the test requeues it, the second returns
    the number of starts it has seen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __call__(self) -> int:
        with self.marker.open("a") as f:
            f.write(f"start {os.environ.get('SLURM_JOB_ID')} restart={os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
        starts = sum(line.startswith("start") for line in self.marker.read_text().splitlines())
        if starts == 1:
            time.sleep(300)  # killed by the requeue long before
        with self.marker.open("a") as f:
            f.write("done\n")
        return starts


# --- the tests ---


def test_map_array_runs_on_slurm(tmp_path: Path) -> None:
    executor = _executor(tmp_path / "submitit")
    jobs = executor.map_array(_square, [1, 2, 3])
    assert len(jobs) == 3
    try:
        _wait(jobs)
        results = [job.result() for job in jobs]
    except BaseException:
        _cancel(jobs)
        raise
    assert [r["square"] for r in results] == [1, 4, 9]
    assert all(r["job_id"] for r in results), "the functions did not run inside Slurm jobs"
    assert sorted(r["array_task"] for r in results) == ["0", "1", "2"]


def test_requeued_checkpointable_job_starts_again_and_finishes(tmp_path: Path) -> None:
    marker = tmp_path / "starts.log"
    executor = _executor(tmp_path / "submitit")
    job = executor.submit(StartsTwice(marker))
    try:
        deadline = time.monotonic() + 60
        while not (marker.exists() and marker.read_text().startswith("start")):
            if time.monotonic() > deadline:
                pytest.fail(f"job {job.job_id} did not start within 60s; queue:\n{_run('squeue')}")
            time.sleep(0.5)
        _run("scontrol", "requeue", str(job.job_id))
        _wait([job])
        result = job.result()
    except BaseException:
        _cancel([job])
        raise
    lines = marker.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["start", "start", "done"], lines
    assert lines[1].endswith("restart=1"), lines
    assert result == 2


# --- sweeps through submitit's Slurm executor ---


def _sweep_argv(tmp_path: Path, plan_text: str) -> list[str]:
    plan = tmp_path / "plan.yaml"
    plan.write_text(plan_text)
    return ["--plan", str(plan), "--workdir", str(tmp_path), "--executor", "slurm"]


def test_sweep_on_slurm_writes_each_record_once(tmp_path: Path, capsys) -> None:
    from tests.test_sweep import run_two_by_two

    run_two_by_two(tmp_path, capsys, "slurm")


def test_requeued_sweep_job_finishes_with_one_record(tmp_path: Path, capsys) -> None:
    from ringbench.cli import run_main
    from ringbench.store import load_records
    from sweep import cli
    from sweep.jobs import read_status
    from tests.helpers import write_card

    write_card(tmp_path / "cards" / "plain.pth")
    plan = "backbones: [{path: 'cards/*.pth'}]\ntasks:\n  fewshot_digits: {episodes: 200, resources: {time_min: 10}}\n"
    argv = _sweep_argv(tmp_path, plan)
    assert run_main(cli.main, [*argv, "--no-wait"]) == 0
    status_path = tmp_path / "sweeps" / "plan" / "status" / "fewshot_digits__plain.json"
    deadline = time.monotonic() + 90
    while read_status(status_path).get("state") != "running":
        if time.monotonic() > deadline:
            pytest.fail(f"the sweep's job did not start; queue:\n{_run('squeue')}")
        time.sleep(0.5)
    job_id = read_status(status_path)["job_id"]
    _run("scontrol", "requeue", str(job_id))
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while read_status(status_path).get("state") not in ("done", "failed"):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)
            pytest.fail(f"the requeued job did not finish; queue:\n{_run('squeue')}")
        time.sleep(1)
    status = read_status(status_path)
    assert status["state"] == "done" and status["starts"] == 2, status
    assert len(load_records(tmp_path / "results")) == 1


def test_grid_task_job_waits_for_its_point_jobs_on_slurm(tmp_path: Path) -> None:
    """A grid task's job waits (``afterok`` on its points' array task ids): it runs after its points when they
    succeed, and Slurm removes it unstarted when one fails (``kill-on-invalid-dep``), which the sweep marks
    cancelled. The jobs run ``transfer/run.py --list-tasks`` (succeeds) or an unknown task (fails): no grid task
    is needed in the jobs' processes."""
    import threading

    from sweep.expand import Job
    from sweep.jobs import read_status, status_file
    from sweep.plan import Layout, Resources
    from sweep.schedule import Sweep

    layout = Layout(tmp_path, tmp_path / "results", tmp_path / "sweeps" / "plan")
    layout.status_dir.mkdir(parents=True)
    ok, bad = ["--list-tasks"], ["--task", "no_such_task"]
    jobs = []
    for card, argvs in (("good", (ok, ok)), ("bad", (ok, bad))):
        points = [f"t/{card}/{p}" for p in ("a", "b")]
        jobs += [Job(key, "transfer", argv, "", Resources()) for key, argv in zip(points, argvs)]
        jobs.append(Job(f"t/{card}", "transfer", ok, "", Resources(), after=points))
    cluster = {"partition": _partition(), "array_parallelism": 2, "account": None, "qos": None, "constraint": None}
    sweep = Sweep(jobs, layout, {"cluster": cluster}, "slurm", "plan")
    sweep.run_slurm()
    waiter = threading.Thread(target=sweep.wait, kwargs={"progress": False, "poll_s": 1, "gone_s": 10}, daemon=True)
    waiter.start()
    waiter.join(JOB_TIMEOUT_S)
    if waiter.is_alive():
        _cancel(list(sweep.handles.values()))
        pytest.fail(f"the sweep's jobs did not end: {sweep.states}; queue:\n{_run('squeue')}")
    assert sweep.states == {
        "t/good/a": "done",
        "t/good/b": "done",
        "t/good": "done",
        "t/bad/a": "done",
        "t/bad/b": "failed",
        "t/bad": "cancelled",
    }, sweep.notes
    assert read_status(status_file(layout, "t/bad"))["state"] == "cancelled"
    started = read_status(status_file(layout, "t/good"))["updated"]
    assert started > max(read_status(status_file(layout, f"t/good/{p}"))["updated"] for p in "ab")
