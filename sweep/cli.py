"""Sweeps: every (card x task) of a plan as a job, through submitit, on Slurm or on this machine.

    python -m sweep --plan demo                       # configs/sweeps/demo.yaml, here
    python -m sweep --plan my_plan.yaml --executor slurm --no-wait
    python -m sweep --plan my_plan.yaml --status
    python -m sweep --plan my_plan.yaml --dry-run

A plan (YAML) lists backbones (existing cards by path or glob, or recipes to pretrain first, one card
per pretraining seed) and tasks with their flags (named like ``transfer/run.py``'s) and resources::

    backbones:
      - {path: cards/*.pth}
      - {name: ring_moco, config: moco_ring, seeds: [0, 1, 2]}
    tasks:
      fewshot_digits: {episodes: 300}
      voc_det: {seeds: 5, resources: {gpus: 8, time_min: 600}}
    cluster: {partition: gpu, array_parallelism: 64}

Each pretraining and each transfer is one submitit job running the stage's own ``main`` (the
commands a user would type). A job whose result exists is not submitted: a card made with the config
the plan resolves to, a record with the same identity. On Slurm, jobs go in job arrays (one per stage,
card and resources); transfer jobs wait for their card: a Slurm dependency (``afterok``) on a cluster,
ordering on one machine, where ``--jobs`` jobs run at once
through submitit's local executor. Jobs are checkpointable: a preempted or requeued job starts again
(pretraining resumes from its work folder's checkpoint; a transfer job reuses its feature cache).
Every job writes its state to ``<sweep>/status/<job>.json``; ``--status`` reads those and the
scheduler's queue. When all jobs are done, the leaderboard of the plan's cards and tasks is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ringbench.cli import add_common_flags, run_main, sigterm_as_interrupt
from ringbench.config import compose, find_config, read_yaml_mapping
from ringbench.errors import UserError
from ringbench.fileio import atomic_write_text, path_component

STAGES = {"pretrain": "pretrain.run", "transfer": "transfer.run"}
EXECUTORS = ("auto", "local", "slurm", "debug")
STATES_FINAL = ("done", "skipped", "failed", "cancelled")
EXISTS = ("card exists", "record exists")  # skip reasons that mean the job's result is there


# --- the plan ------------------------------------------------------------------------------------


@dataclass
class Resources:
    """What one job asks of the scheduler (Slurm); on one machine only ``gpus`` is read."""

    gpus: int = 0
    cpus: int = 2
    mem_gb: float = 8.0
    time_min: int = 120
    nodes: int = 1


@dataclass
class BackboneEntry:
    """Existing cards (``path``: a path or a glob) or a recipe (``name`` + pretraining ``config``)."""

    path: Optional[str] = None
    name: Optional[str] = None
    config: Optional[str] = None
    seeds: Optional[list[int]] = None  # one card per pretraining seed (default: the config's seed)
    args: list[str] = field(default_factory=list)  # extra pretrain/run.py arguments
    optional: bool = False  # left out by --quick
    resources: Resources = field(default_factory=Resources)


@dataclass
class ClusterSettings:
    partition: Optional[str] = None
    array_parallelism: int = 64
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None


@dataclass
class PlanSchema:
    backbones: list[BackboneEntry] = field(default_factory=list)
    tasks: dict[str, Any] = field(default_factory=dict)  # task -> {flag: value, ..., resources: {...}}
    pretrain_args: list[str] = field(default_factory=list)  # for every recipe
    cluster: ClusterSettings = field(default_factory=ClusterSettings)


@dataclass
class Job:
    """One stage run: ``python <stage>/run.py <argv>`` as a submitit job."""

    key: str  # unique in the sweep: "pretrain/<card>" or "<task>/<card>"
    stage: str  # "pretrain" | "transfer"
    argv: list[str]
    card: str  # the card file this job writes (pretrain) or reads (transfer)
    resources: Resources
    depends_on: Optional[str] = None  # key of the pretrain job that makes the card
    skip_reason: str = ""  # set when its result already exists
    task: Optional[str] = None  # transfer jobs: the task and its resolved config's hash (the record's identity)
    config_hash: Optional[str] = None


def load_plan(path: Path) -> dict[str, Any]:
    """The plan file merged over :class:`PlanSchema`: unknown keys and wrong types are one-line errors."""
    data = read_yaml_mapping(path, "sweep plan")
    plan = compose(PlanSchema, [(str(path), data)])
    if not plan["backbones"]:
        raise UserError(f"{path}: the plan needs a non-empty 'backbones' list")
    if not plan["tasks"]:
        raise UserError(f"{path}: the plan needs a non-empty 'tasks' mapping")
    return plan


def _resources(data: Any, where: str) -> Resources:
    values = compose(Resources, [(where, data or {})])
    res = Resources(**values)
    if res.gpus < 0 or res.cpus < 1 or res.mem_gb <= 0 or res.time_min < 1 or res.nodes < 1:
        raise UserError(f"{where}: resources need gpus >= 0, cpus >= 1, mem_gb > 0, time_min >= 1, nodes >= 1")
    return res


def flag_argv(overrides: dict[str, Any]) -> list[str]:
    """``{episodes: 300, eval_only: true}`` -> ``["--episodes", "300", "--eval-only"]``."""
    argv: list[str] = []
    for key, value in overrides.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


@dataclass
class Layout:
    """Where a sweep's files go, all under ``workdir`` unless given."""

    workdir: Path
    results: Path
    sweep_dir: Path

    @property
    def cards(self) -> Path:
        return self.workdir / "cards"

    @property
    def runs(self) -> Path:
        return self.workdir / "runs"

    @property
    def cache(self) -> Path:
        return self.workdir / "cache"

    @property
    def status_dir(self) -> Path:
        return self.sweep_dir / "status"


def expand(plan: dict[str, Any], layout: Layout, device: str, quick: bool = False) -> list[Job]:
    """Every job of the plan, pretraining first; checked (tasks, cards, globs, flags, resources)."""
    from transfer.tasks import all_tasks

    tasks = all_tasks()
    unknown = [t for t in plan["tasks"] if t not in tasks]
    if unknown:
        raise UserError(f"plan: unknown task(s) {unknown}; available: {', '.join(tasks)}")
    jobs: list[Job] = []
    cards: list[tuple[Path, Optional[str]]] = []  # (card, key of the job that makes it)
    for i, entry in enumerate(plan["backbones"]):
        where = f"plan backbones[{i}]"
        if quick and entry["optional"]:
            continue
        if (entry["path"] is None) == (entry["name"] is None):
            raise UserError(f"{where}: give either 'path' (existing cards) or 'name' with 'config' (a recipe)")
        if entry["path"] is not None:
            pattern = Path(os.path.expanduser(entry["path"]))
            pattern = pattern if pattern.is_absolute() else layout.workdir / pattern  # relative to the workdir
            matched = [Path(m).resolve() for m in sorted(glob.glob(str(pattern))) if Path(m).is_file()]
            if not matched:
                raise UserError(f"{where}: {entry['path']!r} matches no file (under {layout.workdir})")
            cards += [(m, None) for m in matched]
            continue
        if not entry["config"]:
            raise UserError(f"{where}: recipe {entry['name']!r} needs a pretraining 'config'")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", entry["name"]):
            raise UserError(f"{where}: recipe name {entry['name']!r} may hold only letters, digits, '_', '.', '-'")
        path_component(entry["name"], f"{where}: recipe name")  # not '..', not hidden: a folder of its own
        config = find_config(entry["config"], "pretrain")
        resources = _resources(entry["resources"], f"{where}.resources")
        seeds = entry["seeds"] or [None]
        for seed in seeds:
            stem = entry["name"] if seed is None else f"{entry['name']}_s{seed}"
            card = layout.cards / f"{stem}.pth"
            argv = [
                "--config",
                str(config),
                "--out",
                str(card),
                "--workdir",
                str(layout.runs / "pretrain" / stem),
                "--device",
                "cuda" if resources.gpus else device,
                *map(str, plan["pretrain_args"]),
                *map(str, entry["args"]),
                *(["--seed", str(seed)] if seed is not None else []),
                "--no-progress",
            ]
            jobs.append(Job(f"pretrain/{stem}", "pretrain", argv, str(card), resources))
            cards.append((card, jobs[-1].key))
    names = [c.stem for c, _ in cards]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"plan: several cards are named {twice}; card names (file stems) must be unique")
    for task, settings in plan["tasks"].items():
        settings = dict(settings or {})
        if not all(isinstance(k, str) for k in settings):
            raise UserError(f"plan tasks.{task}: flags must be names")
        resources = _resources(settings.pop("resources", None), f"plan tasks.{task}.resources")
        if resources.nodes > 1 and tasks[task].family != "detectron2":
            raise UserError(f"plan tasks.{task}.resources: nodes > 1 needs a Detectron2 task (multi-machine launch)")
        extra = flag_argv(settings)
        for card, maker in cards:
            argv = [
                "--backbone",
                str(card),
                "--task",
                task,
                "--results",
                str(layout.results),
                "--output-dir",
                str(layout.runs / "transfer"),
                "--cache-dir",
                str(layout.cache),
                "--device",
                "cuda" if resources.gpus else device,
                *(["--num-gpus", str(resources.gpus)] if resources.gpus and _uses_gpus_flag(task) else []),
                # several nodes: machine rank and rendezvous come from the job environment (StageJob)
                *(["--num-machines", str(resources.nodes)] if resources.nodes > 1 else []),
                *extra,
            ]
            jobs.append(Job(f"{task}/{card.stem}", "transfer", argv, str(card), resources, depends_on=maker))
    from ringbench.store import config_hash

    for job in jobs:  # every job's flags parse and its config resolves, before anything is submitted
        if job.stage == "transfer":
            args, task_config = _transfer_config(job.argv, job.key)
            job.task, job.config_hash = args.task, config_hash(task_config)
    return jobs


def _strict_parser(parser: argparse.ArgumentParser, where: str) -> argparse.ArgumentParser:
    def error(message: str) -> Any:
        raise UserError(f"{where}: {message}")

    parser.error = error  # type: ignore[method-assign]  # argparse exits on errors; a plan reports them
    return parser


def _uses_gpus_flag(task: str) -> bool:
    """Whether a task takes ``--num-gpus`` (the Detectron2 family; others run on one device)."""
    from transfer.tasks import get_task

    return get_task(task).family == "detectron2"


def _transfer_config(argv: list[str], where: str) -> tuple[argparse.Namespace, dict[str, Any]]:
    from transfer.run import build_parser, refuse_foreign_flags
    from transfer.tasks import get_task

    args = _strict_parser(build_parser(), f"plan job {where}").parse_args(argv)
    try:
        task = get_task(args.task)
        refuse_foreign_flags(args, task)
        return args, task.make_config(args)
    except UserError as exc:
        raise UserError(f"plan job {where}: {exc}") from exc


def mark_existing(jobs: list[Job], results: Path, force: bool = False) -> None:
    """Set ``skip_reason`` on jobs whose result exists: a card made with this config, a record
    with the job's identity in ``results`` (the lookup ``transfer/run.py`` makes before it runs)."""
    from pretrain.run import card_changes
    from ringbench.store import find_record

    fresh: set[str] = set()
    for job in jobs:
        if job.stage == "pretrain":
            changed = card_changes(job.argv)
            if changed == []:
                job.skip_reason = "card exists"
            else:
                fresh.add(job.key)
                if changed:  # made with another config: its checkpoints are stale too
                    job.argv.append("--fresh")
        elif not force and job.depends_on not in fresh and Path(job.card).is_file():
            assert job.task is not None and job.config_hash is not None  # set by expand()
            if find_record(results, card_sha256(job.card), job.task, job.config_hash):
                job.skip_reason = "record exists"
        if force and job.stage == "transfer" and "--force" not in job.argv:
            job.argv.append("--force")


@functools.lru_cache(maxsize=4096)
def _sha256_of(path: str, mtime_ns: int, size: int) -> str:
    from ringbench.fileio import sha256_file

    return sha256_file(path)


def card_sha256(path: str | os.PathLike) -> str:
    """A card's SHA-256, hashed once per version of the file (cards are large; a sweep asks twice)."""
    stat = os.stat(path)
    return _sha256_of(os.fspath(path), stat.st_mtime_ns, stat.st_size)


# --- running -------------------------------------------------------------------------------------


class StageJob:
    """The callable a submitit job runs: one stage's ``main(argv)``, with its state in a JSON file.

    Checkpointable: when the scheduler preempts it or its time runs out, submitit calls
    :meth:`checkpoint`, which requeues the same call (pretraining resumes from its checkpoint)."""

    def __init__(self, key: str, stage: str, argv: list[str], status_file: str, threads: int | None = None) -> None:
        self.key, self.stage, self.argv = key, stage, list(argv)
        self.status_file, self.threads = status_file, threads

    def __call__(self) -> int:
        import importlib

        argv = multi_node_argv(self.argv)
        if node_rank() > 0:  # another node of a multi-node job: its part of the run; node 0 keeps the state
            if self.threads:
                import torch

                torch.set_num_threads(self.threads)
            code = run_main(importlib.import_module(STAGES[self.stage]).main, argv)
            if code != 0:
                raise RuntimeError(f"{self.key} (node {node_rank()}): {self.stage}/run.py exited with {code}")
            return code
        starts = int(read_status(self.status_file).get("starts", 0)) + 1  # > 1: requeued or retried
        write_status(
            self.status_file, "running", host=os.uname().nodename, pid=os.getpid(), job_id=_job_id(), starts=starts
        )
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        start = time.time()
        try:
            code = run_main(importlib.import_module(STAGES[self.stage]).main, argv)
        except BaseException as exc:
            write_status(self.status_file, "failed", error=_last_line(repr(exc)), wall_s=round(time.time() - start))
            raise
        if code != 0:
            write_status(self.status_file, "failed", error=f"exit {code}", wall_s=round(time.time() - start))
            raise RuntimeError(f"{self.key}: {self.stage}/run.py exited with {code}")
        write_status(self.status_file, "done", wall_s=round(time.time() - start))
        return code

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        write_status(self.status_file, "requeued", job_id=_job_id())
        return submitit.helpers.DelayedSubmission(self)


def _wait_for(handle: Any, seconds: float) -> None:
    """Until a cancelled local job has ended (it stops at its next Python instruction), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while not handle.done() and time.monotonic() < deadline:
        time.sleep(0.1)


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


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def write_status(path: str | os.PathLike, state: str, **fields: Any) -> None:
    """A job's state, atomically (readers on other machines never see half a file)."""
    old = read_status(path)
    old.update(fields)
    old.update(state=state, updated=time.time())
    atomic_write_text(path, json.dumps(old))


def read_status(path: str | os.PathLike) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def status_file(layout: Layout, key: str) -> Path:
    return layout.status_dir / (key.replace("/", "__") + ".json")


def make_executor(kind: str, layout: Layout, resources: Resources, plan: dict[str, Any], name: str) -> Any:
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

    def save(self) -> None:
        """``jobs.json``: every job, its command, scheduler id and log, for ``--status`` (a job not
        submitted this time keeps what the last submission of it recorded)."""
        path = self.layout.sweep_dir / "jobs.json"
        before = {e["key"]: e for e in json.loads(path.read_text())["jobs"]} if path.is_file() else {}
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
        handle = executor.submit(self._stage_job(job))
        self.handles[job.key] = handle
        return handle

    def run_local(self, progress: bool = True) -> None:
        """At most ``parallel`` jobs at once; a transfer job starts once its card's job is done."""
        todo = [j for j in self.jobs if not j.skip_reason]
        for job in self.jobs:
            if job.skip_reason:
                self.states[job.key] = "skipped"
        running: dict[str, Any] = {}
        try:
            self._schedule(todo, running, progress)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see main): no job outlives its sweep
            for key, handle in running.items():
                handle.cancel(check=False)  # SIGINT: the stage ends as on Ctrl-C (exit 130)
                self._set(key, "cancelled", "the sweep was interrupted", progress)
            for handle in running.values():
                _wait_for(handle, seconds=30)
            self.save()
            raise

    def _schedule(self, todo: list[Job], running: dict[str, Any], progress: bool) -> None:
        while todo or running:
            for job in list(todo):
                dep = self.states.get(job.depends_on or "", "done" if job.depends_on is None else "pending")
                if dep == "skipped":  # its card's job was not run now: the card is there or it is not
                    dep = "done" if Path(job.card).is_file() else "failed"
                if dep in ("failed", "cancelled"):
                    todo.remove(job)
                    self._set(job.key, "cancelled", f"no card: its job {job.depends_on} did not make it", progress)
                elif dep == "done" and len(running) < self.parallel:
                    todo.remove(job)
                    running[job.key] = self.submit(job)
                    self.save()
                    self._set(job.key, "running", "", progress)
            for key, handle in list(running.items()):
                # the debug executor runs the job here, on this call (its done() would open pdb on an error)
                if self.executor == "debug" or handle.done():
                    del running[key]
                    exc = handle.exception()
                    error = _last_line(str(exc)) if exc is not None else ""
                    self._set(key, "failed" if exc is not None else "done", error, progress)
            time.sleep(0.2)

    def run_slurm(self) -> None:
        """Slurm job arrays: one per (stage, card's pretraining job, resources), at most
        ``cluster.array_parallelism`` tasks of an array at once; a transfer array waits (``afterok``)
        for the pretraining job of its card, and is cancelled if that fails."""
        groups: dict[tuple[str, str, str], list[Job]] = {}
        for job in self.jobs:
            if job.skip_reason:
                self.states[job.key] = "skipped"
                continue
            groups.setdefault((job.stage, job.depends_on or "", repr(job.resources)), []).append(job)
        for (stage, depends_on, _), members in groups.items():  # pretraining groups come first
            executor = make_executor(self.executor, self.layout, members[0].resources, self.plan, stage)
            maker = self.handles.get(depends_on)
            if maker is not None:
                executor.update_parameters(
                    slurm_additional_parameters={"dependency": f"afterok:{maker.job_id}", "kill-on-invalid-dep": "yes"}
                )
            with executor.batch():
                submitted = [(job.key, executor.submit(self._stage_job(job))) for job in members]
            for key, handle in submitted:
                self.handles[key] = handle
                self.states[key] = "pending"
        self.save()

    def wait(self, progress: bool = True, poll_s: float = 2.0) -> None:
        """Until every submitted job is done, failed or gone: read from the jobs' state files and
        ``squeue`` (submitit's own watcher needs ``sacct``, which clusters without accounting lack)."""
        gone: dict[str, float] = {}
        while True:
            queue = _squeue_states()
            for key, handle in self.handles.items():
                if self.states.get(key) in STATES_FINAL:
                    continue
                status = read_status(status_file(self.layout, key))
                queued = queue.get(str(handle.job_id))
                state = slurm_state(status, queued)
                if state in ("done", "failed"):
                    self._set(key, state, status.get("error", ""), progress)
                elif queued is None:  # left the queue: its state file should say how; give it a moment
                    if time.monotonic() - gone.setdefault(key, time.monotonic()) > 30:
                        self._set(key, "cancelled", "left the queue without finishing", progress)
                else:
                    gone.pop(key, None)
                    if state != self.states.get(key):
                        self._set(key, state, "", progress)
            if all(self.states.get(k) in STATES_FINAL for k in self.handles):
                return
            time.sleep(poll_s)

    def _set(self, key: str, state: str, note: str, progress: bool) -> None:
        self.states[key] = state
        if progress:
            done = sum(s in STATES_FINAL for s in self.states.values())
            print(
                f"[{done}/{len(self.jobs)}] {key}: {state}" + (f" ({note})" if note else ""),
                file=sys.stderr,
                flush=True,
            )


# --- status --------------------------------------------------------------------------------------


def _squeue_states() -> dict[str, str]:
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
    queue = _squeue_states() if data.get("executor") == "slurm" else {}
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sweep",
        description="Run a sweep plan (backbones x tasks) as submitit jobs on Slurm or on this machine, skip what "
        "exists, and print the leaderboard of the plan's cards and tasks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--plan", required=True, help="plan YAML: a path, or a shipped plan's name (configs/sweeps/)")
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="auto",
        help="slurm (submitit's Slurm executor), local (this machine, --jobs at once), auto: slurm where a Slurm "
        "controller answers, else local; debug: submitit's debug executor, every job in this process (tests, pdb)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("."), help="cards/, runs/, cache/ and sweeps/ go here")
    parser.add_argument("--results", type=Path, help="results store (default: WORKDIR/results)")
    parser.add_argument("--jobs", type=int, default=1, help="local executor: jobs at once")
    parser.add_argument("--device", default="auto", help="device of CPU-resource jobs ('auto': CUDA when present)")
    parser.add_argument("--quick", action="store_true", help="leave out the plan's optional backbones")
    parser.add_argument("--force", action="store_true", help="rerun transfer jobs whose record exists")
    parser.add_argument("--dry-run", action="store_true", help="list the jobs with their resources; submit nothing")
    parser.add_argument("--status", action="store_true", help="the state of every job of the last submission")
    parser.add_argument("--retry-failed", action="store_true", help="submit again the jobs that failed")
    parser.add_argument("--no-wait", action="store_true", help="return once submitted (Slurm)")
    parser.add_argument("--no-table", action="store_true", help="do not print the leaderboard at the end")
    add_common_flags(parser)
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    from tabulate import tabulate

    args = build_parser().parse_args(argv)
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    plan_path = find_config(args.plan, "sweeps", "sweep plan")
    workdir = args.workdir.resolve()
    layout = Layout(workdir, (args.results or workdir / "results").resolve(), workdir / "sweeps" / plan_path.stem)
    if args.status:
        headers = ["job", "state", "job id", "wall", "log", "error / note"]
        print(tabulate(status_rows(layout), headers=headers))
        return 0
    plan = load_plan(plan_path)
    from transfer.run import resolve_device

    device = resolve_device(args.device)
    jobs = expand(plan, layout, device, quick=args.quick)
    executor = resolve_executor(args.executor)
    mark_existing(jobs, layout.results, force=args.force)
    if args.retry_failed:
        failed_before = {r[0] for r in status_rows(layout) if r[1] in ("failed", "cancelled")}
        for job in jobs:
            if job.key not in failed_before and job.depends_on not in failed_before and not job.skip_reason:
                job.skip_reason = "not failed"
    if args.dry_run:
        rows = [
            [
                j.key,
                j.skip_reason or "submit",
                j.depends_on or "",
                _resource_text(j.resources),
                j.stage,
                " ".join(j.argv),
            ]
            for j in jobs
        ]
        print(tabulate(rows, headers=["job", "action", "after", "resources", "stage", "arguments"]))
        return 0
    todo = [j for j in jobs if not j.skip_reason]
    print(
        f"sweep {plan_path.stem}: {len(jobs)} jobs, {len(todo)} to run, {len(jobs) - len(todo)} done already; "
        f"executor {executor}; folder {layout.sweep_dir}",
        file=sys.stderr,
    )
    sweep = Sweep(jobs, layout, plan, executor, plan_path.stem, parallel=args.jobs)
    if executor in ("local", "debug"):
        with sigterm_as_interrupt():  # `kill` or a scheduler's timeout stops the jobs too, as Ctrl-C does
            sweep.run_local(progress=True)
    else:
        sweep.run_slurm()
        if args.no_wait:
            print(f"submitted; follow with: python -m sweep --plan {args.plan} --status", file=sys.stderr)
            return 0
        sweep.wait(progress=True)
    sweep.save()
    failed = sorted(k for k, s in sweep.states.items() if s in ("failed", "cancelled"))
    if not args.no_table:
        print_table(jobs, layout)
    if failed:
        raise UserError(f"{len(failed)} job(s) failed: {', '.join(failed[:5])}; see --status for their logs")
    return 0


def _resource_text(res: Resources) -> str:
    gpus = f"{res.gpus} GPU, " if res.gpus else ""
    return f"{gpus}{res.cpus} CPU, {res.mem_gb:g} GB, {res.time_min} min" + (
        f", {res.nodes} nodes" if res.nodes > 1 else ""
    )


def print_table(jobs: list[Job], layout: Layout) -> None:
    """The leaderboard of this plan's cards and tasks only (other records in the store are left out)."""
    from leaderboard.cli import render_html, render_markdown, table_from_records
    from ringbench.store import load_records

    cards = {card_sha256(j.card) for j in jobs if j.stage == "transfer" and Path(j.card).is_file()}
    tasks = {j.task for j in jobs if j.task}
    records = [r for r in load_records(layout.results) if r.get("backbone_sha256") in cards and r["task"] in tasks]
    if not records:
        print("no records for this plan yet", file=sys.stderr)
        return
    table = table_from_records(records, sorted(tasks))
    text = render_markdown(table)
    atomic_write_text(layout.sweep_dir / "leaderboard.md", text)
    atomic_write_text(layout.sweep_dir / "leaderboard.html", render_html(table))
    print("\n" + text)
    print(f"tables in {layout.sweep_dir}/leaderboard.md and .html", file=sys.stderr)


def cli() -> None:
    """Console-script entry point (``ringbench-sweep``)."""
    sys.exit(run_main(main))
