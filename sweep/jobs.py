"""The job a scheduler runs: :class:`StageJob` calls one stage's ``main(argv)`` and keeps its state in a JSON
file of its own (``<sweep>/status/<job>.json``), which ``--status`` and the Slurm watcher read."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ringbench.cli import run_main
from ringbench.fileio import atomic_write_text
from sweep.plan import Layout

STAGES = {"pretrain": "pretrain.run", "transfer": "transfer.run"}  # importable paths: submitit pickles the jobs


class StageJob:
    """The callable a submitit job runs: one stage's ``main(argv)``, with its state in a JSON file.

    Checkpointable: when the scheduler preempts it or its time runs out, submitit calls
    :meth:`checkpoint`, which requeues the same call (pretraining resumes from its checkpoint)."""

    def __init__(self, key: str, stage: str, argv: list[str], status_file: str, threads: int | None = None) -> None:
        self.key, self.stage, self.argv = key, stage, list(argv)
        self.status_file, self.threads = status_file, threads

    def __call__(self) -> None:
        """Run the stage; its outcome goes to the state file only (a job returns nothing: the sweep never reads
        submitit's result pickles). A failure or a stop ends the job with a non-zero exit (Slurm's ``afterok``
        sees it); in a local job SIGTERM stops the stage as Ctrl-C does (its state: cancelled)."""
        if os.environ.get("SUBMITIT_EXECUTOR") == "local":
            _sigterm_stops_once()
        argv = multi_node_argv(self.argv)
        if node_rank() > 0:  # another node of a multi-node job: its part of the run; node 0 keeps the state
            code = self._run(argv)
            if code != 0:
                _end(code, f"{self.key} (node {node_rank()}): {self.stage}/run.py exited with {code}")
            return
        starts = int(read_status(self.status_file).get("starts", 0)) + 1  # > 1: requeued or retried
        write_status(
            self.status_file, "running", host=os.uname().nodename, pid=os.getpid(), job_id=_job_id(), starts=starts
        )
        start = time.time()
        stderr = _LastLine(sys.stderr)
        sys.stderr = stderr
        try:
            code = self._run(argv)
        except KeyboardInterrupt:  # stopped before the stage's main ran (importing it)
            code = 130
        except BaseException as exc:
            write_status(self.status_file, "failed", error=last_line(repr(exc)), wall_s=round(time.time() - start))
            raise
        finally:
            sys.stderr = stderr.stream
        wall = round(time.time() - start)
        if code == 130:  # Ctrl-C, or SIGTERM from its sweep
            write_status(self.status_file, "cancelled", error="stopped by a signal (exit 130)", wall_s=wall)
            _end(code, f"{self.key}: {self.stage}/run.py was stopped")
        if code != 0:
            last = stderr.last.removeprefix("error: ")  # run_main's one line
            error = f"exit {code}" + (f": {last}" if last else "")
            write_status(self.status_file, "failed", error=error[:300], wall_s=wall)
            _end(code, f"{self.key}: {self.stage}/run.py exited with {code}")
        write_status(self.status_file, "done", wall_s=wall)

    def _run(self, argv: list[str]) -> int:
        """The stage's ``main(argv)`` through ``run_main`` (one-line errors, exit codes), on ``threads`` threads."""
        import importlib

        main = importlib.import_module(STAGES[self.stage]).main
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        return run_main(main, argv)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        write_status(self.status_file, "requeued", job_id=_job_id())
        return submitit.helpers.DelayedSubmission(self)


class _LastLine:
    """A text stream that passes every write on and remembers the last non-empty line (the stage's one-line
    error, which ``run_main`` prints last, goes to the job's state file)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.last, self._partial = stream, "", ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self.last = line.strip()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _sigterm_stops_once() -> None:
    """SIGTERM raises KeyboardInterrupt once (the stage ends as on Ctrl-C; a repeated signal does not break its
    cleanup). Submitit's job wrapper passes SIGTERM by (Slurm sends it before a preemption), and a job started
    from a non-interactive shell's background ignores SIGINT, so a local sweep stops its jobs with SIGTERM."""

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def _end(code: int, message: str) -> None:
    """End a job that failed or was stopped: in a job process by exiting with ``code`` (no traceback, no result
    pickle); in the debug executor, which runs jobs in the sweep's own process, by an exception."""
    if os.environ.get("SUBMITIT_EXECUTOR") in ("local", "slurm"):
        raise SystemExit(code)
    raise RuntimeError(message)


def node_rank() -> int:
    """This node's rank in a multi-node Slurm job (``SLURM_NODEID``; 0 outside Slurm)."""
    return int(os.environ.get("SLURM_NODEID", "0") or 0)


def multi_node_argv(argv: list[str]) -> list[str]:
    """A transfer job's arguments with ``--machine-rank`` and ``--dist-url`` from the Slurm job environment
    when it asks for several machines (``--num-machines``) and does not name them itself."""
    if "--num-machines" not in argv or "--dist-url" in argv or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return list(argv)
    from transfer.d2.launch import slurm_rendezvous

    rank, url = slurm_rendezvous()
    return [*argv, "--machine-rank", str(rank), "--dist-url", url]


def _job_id() -> str | None:
    """This job's Slurm id (``<array job>_<task>`` for an array task), or None outside Slurm."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def last_line(text: str) -> str:
    """The last non-empty line of an error, at most 300 characters: what a state file and ``--status`` show."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def write_status(path: str | os.PathLike, state: str, **fields: Any) -> None:
    """A job's state, atomically (readers on other machines never see half a file)."""
    old = read_status(path)
    old.update(fields)
    old.update(state=state, updated=time.time())
    atomic_write_text(path, json.dumps(old))


def read_status(path: str | os.PathLike) -> dict[str, Any]:
    """A job's state file as a dict; {} while there is none (or it cannot be read)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def status_file(layout: Layout, key: str) -> Path:
    """Where the job ``key`` writes its state (``status/<task>__<card>.json``)."""
    return layout.status_dir / (key.replace("/", "__") + ".json")
