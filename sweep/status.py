"""``--status``: one row per job of a sweep's last submission, from the jobs' state files and, on Slurm, the
scheduler's queue."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ringbench.errors import UserError
from sweep.jobs import read_status, status_file
from sweep.plan import Layout

STATES_FINAL = ("done", "skipped", "failed", "cancelled")
EXISTS = ("card exists", "record exists")  # skip reasons that mean the job's result is there


def squeue_states() -> dict[str, str]:
    """Slurm job id -> state of every job in the queue (empty where there is no ``squeue``)."""
    if shutil.which("squeue") is None:
        return {}
    # -r: one line per array task ("12_3 RUNNING"), pending ones too
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True, check=False).stdout
    return dict(line.split(None, 1) for line in out.splitlines() if " " in line)


def slurm_state(status: dict[str, Any], queued: str | None, default: str = "pending") -> str:
    """A Slurm job's state: its own state file once it has finished, else what ``squeue`` says of it."""
    state = status.get("state", default)
    if state in ("done", "failed", "cancelled") or queued is None:
        return state
    return queued.lower()


def read_jobs_file(path: Path) -> dict[str, Any]:
    """A sweep's ``jobs.json``, checked: a file that is not JSON or not shaped as the sweep writes it is one line
    naming it (a :class:`UserError`), never a traceback."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: damaged, not JSON ({exc}); remove it, then run the sweep again") from exc
    jobs = data.get("jobs") if isinstance(data, dict) else None
    if not isinstance(jobs, list) or not all(isinstance(e, dict) and _entry_ok(e) for e in jobs):
        raise UserError(f"{path}: damaged, not a sweep's list of jobs; remove it, then run the sweep again")
    return data


def _entry_ok(entry: dict[str, Any]) -> bool:
    """Whether a ``jobs.json`` entry has the fields it is read for, of their types: ``key``, ``skip_reason``, and
    where present ``depends_on`` and ``grid_point`` (a key, a name or null) and ``after`` (a list of keys)."""
    after = entry.get("after", [])
    return (
        isinstance(entry.get("key"), str)
        and isinstance(entry.get("skip_reason"), str)
        and all(isinstance(entry.get(k), (str, type(None))) for k in ("depends_on", "grid_point"))
        and isinstance(after, list)
        and all(isinstance(k, str) for k in after)
    )


def status_rows(layout: Layout) -> list[list[Any]]:
    """One row per job of the last submission: job, state, scheduler id, wall time, log, last error."""
    path = layout.sweep_dir / "jobs.json"
    if not path.is_file():
        raise UserError(f"{path}: no sweep has been submitted from this plan and workdir")
    data = read_jobs_file(path)
    queue = squeue_states() if data.get("executor") == "slurm" else {}
    rows = []
    for entry in data["jobs"]:
        status = read_status(status_file(layout, entry["key"]))  # where the sweep puts it, not where a file says
        reason = entry["skip_reason"]
        state = "done" if reason in EXISTS else "skipped" if reason else status.get("state", "not submitted")
        job_id = entry.get("job_id")
        if data.get("executor") == "slurm" and not reason:
            state = slurm_state(status, queue.get(str(job_id)) if job_id else None, default=state)
        elif state == "running" and data.get("executor") == "local" and not _alive(status.get("pid")):
            state = "failed"
            status.setdefault("error", "the job's process is gone")
        rows.append(
            [
                entry["key"],
                state,
                job_id or "",
                f"{status['wall_s']} s" if "wall_s" in status else "",
                entry.get("log") or "",
                status.get("error", "") if state in ("failed", "cancelled") else reason,
            ]
        )
    return rows


def orphans(layout: Layout) -> list[str]:
    """Jobs of an earlier controller of this sweep that still run: a state file saying pending, running or
    requeued whose job process is alive on this host (its command line names this sweep's folder), or whose
    Slurm job is still in the queue (its id from the state file or ``jobs.json``). Each as ``key (where)``."""
    ids: dict[str, str] = {}
    jobs_path = layout.sweep_dir / "jobs.json"
    if jobs_path.is_file():
        ids = {e["key"]: str(e["job_id"]) for e in read_jobs_file(jobs_path)["jobs"] if e.get("job_id")}
    queue: dict[str, str] | None = None
    found = []
    for path in sorted(layout.status_dir.glob("*.json")) if layout.status_dir.is_dir() else []:
        status = read_status(path)
        if status.get("state") not in ("pending", "running", "requeued"):
            continue
        key = str(status.get("key") or path.stem.replace("__", "/"))
        pid, host = status.get("pid"), status.get("host")
        if isinstance(pid, int) and host == os.uname().nodename and _runs_here(pid, layout):
            found.append(f"{key} (pid {pid})")
            continue
        job_id = str(status.get("job_id") or ids.get(key) or "")
        if job_id and shutil.which("squeue"):
            queue = squeue_states() if queue is None else queue
            if job_id in queue:
                found.append(f"{key} (Slurm job {job_id}, {queue[job_id].lower()})")
    return found


def _runs_here(pid: int, layout: Layout) -> bool:
    """Whether ``pid`` is alive on this host and is a submitit job of this sweep (its command line names the
    sweep's folder), not a process that reused the number."""
    if not _alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True  # no /proc: alive is all that can be told
    return str(layout.sweep_dir) in cmdline


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


# --- the command ---------------------------------------------------------------------------------
