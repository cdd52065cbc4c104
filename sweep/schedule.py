"""Running a sweep's jobs: submitit executors (Slurm job arrays, local workers, the debug executor) and the
:class:`Sweep` scheduler, which orders transfer jobs after their card's job (a grid task's own job also after
its grid points' jobs) and records every job in ``jobs.json``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ringbench.errors import UserError
from ringbench.fileio import atomic_write_text
from sweep.expand import Job
from sweep.jobs import StageJob, read_status, status_file, write_status
from sweep.plan import Layout, Resources
from sweep.status import STATES_FINAL, read_jobs_file, slurm_state, squeue_states

EXECUTORS = ("auto", "local", "slurm", "debug")


def make_executor(kind: str, layout: Layout, resources: Resources, plan: dict[str, Any], name: str) -> Any:
    """A submitit executor of ``kind`` asking for ``resources``; on Slurm with the plan's cluster settings."""
    import submitit

    executor = submitit.AutoExecutor(folder=layout.sweep_dir / "submitit" / "%j", cluster=kind)
    params: dict[str, Any] = {
        "timeout_min": resources.time_min,
        "nodes": resources.nodes,
        "tasks_per_node": 1,
        "cpus_per_task": resources.cpus,
        "mem_gb": resources.mem_gb,
        "name": name,
    }
    if resources.gpus:
        params["gpus_per_node"] = resources.gpus
    if kind == "slurm":
        cluster = plan["cluster"]
        params["slurm_array_parallelism"] = cluster["array_parallelism"]
        for key in ("partition", "account", "qos", "constraint"):
            if cluster[key]:
                params[f"slurm_{key}"] = cluster[key]
    executor.update_parameters(**params)
    return executor


@dataclass
class Sweep:
    """The jobs of one plan and how they run."""

    jobs: list[Job]
    layout: Layout
    plan: dict[str, Any]
    executor: str
    name: str
    parallel: int = 1
    handles: dict[str, Any] = field(default_factory=dict)  # key -> submitit job
    states: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # key -> the last error line or why it was not run
    poll_s: float = 0.2  # the local scheduler's pause between looks at its jobs

    def failures(self) -> str:
        """``N job(s) failed: key (its last error line); ...``, or "" when none failed or was cancelled."""
        failed = sorted(k for k, s in self.states.items() if s in ("failed", "cancelled"))
        if not failed:
            return ""
        named = [f"{k} ({self.notes.get(k) or self.states[k]})" for k in failed[:5]]
        more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
        return f"{len(failed)} job(s) failed: {'; '.join(named)}{more}; see --status for their logs"

    def save(self) -> None:
        """``jobs.json``: every job, its command, scheduler id and log, for ``--status`` (a job not
        submitted this time keeps what the last submission of it recorded)."""
        path = self.layout.sweep_dir / "jobs.json"
        before = {e["key"]: e for e in read_jobs_file(path)["jobs"]} if path.is_file() else {}
        entries = []
        for job in self.jobs:
            handle = self.handles.get(job.key)
            old = before.get(job.key, {})
            entries.append(
                {
                    **dataclasses.asdict(job),
                    "job_id": getattr(handle, "job_id", None) if handle is not None else old.get("job_id"),
                    "log": str(handle.paths.stdout) if handle is not None else old.get("log"),
                    "status_file": str(status_file(self.layout, job.key)),
                }
            )
        data = {"plan": self.name, "executor": self.executor, "jobs": entries}
        atomic_write_text(path, json.dumps(data, indent=1))

    def _stage_job(self, job: Job) -> StageJob:
        """The callable of ``job``, with a fresh state file (a new submission starts a new history)."""
        threads: int | None = None  # debug: the job runs in this process, whose threads are left alone
        if self.executor == "slurm":
            threads = job.resources.cpus
        elif self.executor == "local":
            threads = max(1, (os.cpu_count() or 1) // self.parallel)
        path = status_file(self.layout, job.key)
        path.unlink(missing_ok=True)
        write_status(path, "pending", key=job.key)
        return StageJob(job.key, job.stage, job.argv, str(path), threads)

    def submit(self, job: Job) -> Any:
        """One job on its own (this machine's executors)."""
        executor = make_executor(self.executor, self.layout, job.resources, self.plan, job.key)
        if self.executor == "local":  # its processes start with SIGINT ignored: a terminal's Ctrl-C reaches the
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # sweep, which stops them (SIGTERM), as in
            try:  # a background shell; submitit's controller would print a traceback on SIGINT
                handle = executor.submit(self._stage_job(job))
            finally:
                signal.signal(signal.SIGINT, previous)
        else:
            handle = executor.submit(self._stage_job(job))
        self.handles[job.key] = handle
        return handle

    def run_local(self, progress: bool = True) -> None:
        """At most ``parallel`` jobs at once, in the jobs' order; a transfer job starts once its card's job is
        done, a grid task's own job once its grid points' jobs are done too (else it is cancelled). Stopped
        (KeyboardInterrupt: Ctrl-C, or SIGTERM through :func:`ringbench.cli.sigterm_as_interrupt`), it stops the
        jobs it started with SIGTERM, marks them cancelled and raises KeyboardInterrupt again."""
        todo = [j for j in self.jobs if not j.skip_reason]
        for job in self.jobs:
            if job.skip_reason:
                self.states[job.key] = "skipped"
        running: dict[str, Any] = {}
        try:
            self._schedule(todo, running, progress)
        except KeyboardInterrupt:  # no job outlives its sweep
            previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second `kill` does not cut the cleanup
            try:
                self.stop(running, progress)
            finally:
                signal.signal(signal.SIGTERM, previous)
            raise

    def stop(self, running: dict[str, Any], progress: bool, grace_s: float = 30.0) -> None:
        """Stop the running local jobs: SIGTERM to each job's submitit controller (which passes it to the job's
        process) and to the job's process itself (SIGINT would be ignored in a non-interactive shell's
        background); SIGKILL to what still runs after ``grace_s``. Each is marked cancelled."""
        for key, handle in running.items():
            for pid in _job_pids(handle, self.layout, key):
                _signal(pid, signal.SIGTERM)
            if not isinstance(getattr(handle, "_process", None), subprocess.Popen):
                handle.cancel(check=False)  # the debug executor: nothing runs outside this process
            self._set(key, "cancelled", "the sweep was interrupted", progress)
        deadline = time.monotonic() + grace_s
        for key, handle in running.items():
            while not _ended(handle) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not _ended(handle):
                for pid in _job_pids(handle, self.layout, key):
                    _signal(pid, signal.SIGKILL)
            status_path = status_file(self.layout, key)
            state = read_status(status_path).get("state")
            if state in ("pending", "running"):
                write_status(status_path, "cancelled", error="the sweep was interrupted")
            elif state == "done":  # it finished before the signal came
                self._set(key, "done", "", progress)
        self.save()

    def _schedule(self, todo: list[Job], running: dict[str, Any], progress: bool) -> None:
        while todo or running:
            for job in list(todo):
                ready, never = self._ready(job)
                if never:
                    todo.remove(job)
                    write_status(status_file(self.layout, job.key), "cancelled", key=job.key, error=never)
                    self._set(job.key, "cancelled", never, progress)
                elif ready and len(running) < self.parallel:
                    todo.remove(job)
                    running[job.key] = self.submit(job)
                    self.save()
                    self._set(job.key, "running", "", progress)
            for key, handle in list(running.items()):
                if self.executor == "debug":  # runs the job here, in memory (its done() would open pdb on an error)
                    handle.exception()
                elif not _ended(handle):
                    continue
                del running[key]
                state, error = outcome(read_status(status_file(self.layout, key)), getattr(handle, "_process", None))
                self._set(key, state, error, progress)
            time.sleep(self.poll_s)

    def _ready(self, job: Job) -> tuple[bool, str]:
        """Whether ``job`` may start now, and why it never will ("" while it may): its card's job did not make the
        card, or one of its grid points' jobs failed or was cancelled."""
        if job.depends_on is not None:
            dep = self.states.get(job.depends_on, "pending")
            if dep == "skipped":  # its card's job was not run now: the card is there or it is not
                dep = "done" if Path(job.card).is_file() else "failed"
            if dep in ("failed", "cancelled"):
                return False, f"no card: its job {job.depends_on} did not make it"
            if dep != "done":
                return False, ""
        states = [self.states.get(key, "pending") for key in job.after]
        for key, state in zip(job.after, states):
            if state in ("failed", "cancelled"):
                return False, f"its grid point job {key} {state}"
        return all(state in ("done", "skipped") for state in states), ""

    def run_slurm(self) -> None:
        """Slurm job arrays: one per (stage, jobs waited for, resources), at most ``cluster.array_parallelism``
        tasks of an array at once. An array waits (``afterok``) for the jobs its members need, named by their array
        task ids (``123_4``): a transfer array for its card's pretraining job, a grid task's own job also for each
        of its grid points' jobs; it is cancelled if one of them fails (``kill-on-invalid-dep``)."""
        groups: dict[tuple[str, tuple[str, ...], str], list[Job]] = {}
        for job in self.jobs:  # a job's needs come before it, so each group's come in earlier groups
            if job.skip_reason:
                self.states[job.key] = "skipped"
                continue
            groups.setdefault((job.stage, tuple(job.needs()), repr(job.resources)), []).append(job)
        for (stage, needs, _), members in groups.items():  # pretraining groups come first
            executor = make_executor(self.executor, self.layout, members[0].resources, self.plan, stage)
            unsubmitted = [k for k in needs if k not in self.handles and self.states.get(k) != "skipped"]
            if unsubmitted:
                raise RuntimeError(f"{members[0].key}: submitted before {unsubmitted[0]}, which it waits for")
            ids = [str(self.handles[k].job_id) for k in needs if k in self.handles]
            if ids:
                executor.update_parameters(
                    slurm_additional_parameters={"dependency": "afterok:" + ":".join(ids), "kill-on-invalid-dep": "yes"}
                )
            with executor.batch():
                submitted = [(job.key, executor.submit(self._stage_job(job))) for job in members]
            for key, handle in submitted:
                self.handles[key] = handle
                self.states[key] = "pending"
        self.save()

    def wait(self, progress: bool = True, poll_s: float = 2.0, gone_s: float = 30.0) -> None:
        """Until every submitted job is done, failed or gone: read from the jobs' state files and
        ``squeue`` (submitit's own watcher needs ``sacct``, which clusters without accounting lack). A job that
        left the queue without a word for ``gone_s`` is cancelled; one that never started (Slurm removed it when
        a job it waits for failed, or it was scancelled) says so in its state file, for ``--status``."""
        gone: dict[str, float] = {}
        while True:
            queue = squeue_states()
            for key, handle in self.handles.items():
                if self.states.get(key) in STATES_FINAL:
                    continue
                status = read_status(status_file(self.layout, key))
                queued = queue.get(str(handle.job_id))
                state = slurm_state(status, queued)
                if state in ("done", "failed", "cancelled"):
                    self._set(key, state, status.get("error", ""), progress)
                elif queued is None:  # left the queue: its state file should say how; give it a moment
                    if time.monotonic() - gone.setdefault(key, time.monotonic()) > gone_s:
                        note = "left the queue without finishing"
                        if status.get("state", "pending") == "pending":
                            note = "left the queue without starting (a job it waits for failed, or scancel)"
                            write_status(status_file(self.layout, key), "cancelled", error=note)
                        self._set(key, "cancelled", note, progress)
                else:
                    gone.pop(key, None)
                    if state != self.states.get(key):
                        self._set(key, state, "", progress)
            if all(self.states.get(k) in STATES_FINAL for k in self.handles):
                return
            time.sleep(poll_s)

    def _set(self, key: str, state: str, note: str, progress: bool) -> None:
        self.states[key] = state
        self.notes[key] = note
        if progress:
            done = sum(s in STATES_FINAL for s in self.states.values())
            print(
                f"[{done}/{len(self.jobs)}] {key}: {state}" + (f" ({note})" if note else ""),
                file=sys.stderr,
                flush=True,
            )


def outcome(status: dict[str, Any], process: Any = None) -> tuple[str, str]:
    """A finished job's state and last error line, from its own state file (never from what submitit pickled):
    a job that ended without writing done, failed or cancelled failed (killed, or it died before its stage ran)."""
    state = status.get("state")
    if state in ("done", "failed", "cancelled"):
        return state, str(status.get("error", "")) if state != "done" else ""
    code = process.poll() if isinstance(process, subprocess.Popen) else None
    how = f"exit {code}" if code is not None and code >= 0 else f"signal {-code}" if code is not None else "no state"
    return "failed", f"the job ended without saying how ({how}); see its log"


def _ended(handle: Any) -> bool:
    """Whether a submitted local job's process has ended (its ``Popen``); a debug job, which runs in this process
    (its ``done()`` would run it), has nothing left to end."""
    process = getattr(handle, "_process", None)
    return process.poll() is not None if isinstance(process, subprocess.Popen) else True


def _job_pids(handle: Any, layout: Layout, key: str) -> list[int]:
    """The processes of a running local job: submitit's controller (this sweep's child) and the job's own
    process, named by its state file only when this host's ``/proc`` shows it as the controller's child."""
    process = getattr(handle, "_process", None)
    if not isinstance(process, subprocess.Popen) or process.poll() is not None:
        return []
    pids = [process.pid]
    pid = read_status(status_file(layout, key)).get("pid")
    if isinstance(pid, int) and pid != process.pid and _parent(pid) == process.pid:
        pids.append(pid)
    return pids


def _parent(pid: int) -> int | None:
    """The parent of ``pid`` on this host (Linux ``/proc``), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def slurm_answers() -> bool:
    """Whether a Slurm controller answers here (``sbatch`` on PATH is not enough: the daemons may be down)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def resolve_executor(kind: str) -> str:
    """``auto``: Slurm where a controller answers, else this machine."""
    if kind == "auto":
        return "slurm" if slurm_answers() else "local"
    if kind == "slurm" and not slurm_answers():
        raise UserError("--executor slurm: no Slurm controller answers here (sbatch/sinfo); use --executor local")
    return kind
