"""``--status``: one row per job of a sweep's last submission, from the jobs' state files and, on Slurm, the
scheduler's queue."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

from ringbench.errors import UserError
from sweep.jobs import read_status
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
    if state in ("done", "failed") or queued is None:
        return state
    return queued.lower()


def status_rows(layout: Layout) -> list[list[Any]]:
    """One row per job of the last submission: job, state, scheduler id, wall time, log, last error."""
    path = layout.sweep_dir / "jobs.json"
    if not path.is_file():
        raise UserError(f"{path}: no sweep has been submitted from this plan and workdir")
    data = json.loads(path.read_text())
    queue = squeue_states() if data.get("executor") == "slurm" else {}
    rows = []
    for entry in data["jobs"]:
        status = read_status(entry["status_file"])
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
                status.get("error", "") if state == "failed" else reason,
            ]
        )
    return rows


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


# --- the command ---------------------------------------------------------------------------------
