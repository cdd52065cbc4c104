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
the plan resolves to, a record with the same identity. A task with a grid (fine-tuning's learning rate x
weight decay) runs each point as a job of its own (``--grid-point``), then its own job, which writes the record.
On Slurm, jobs go in job arrays (one per stage, jobs waited for and resources); transfer jobs wait for their
card (and a grid task's job for its points): a Slurm dependency (``afterok``) on a cluster,
ordering on one machine, where ``--jobs`` jobs run at once
through submitit's local executor. Jobs are checkpointable: a preempted or requeued job starts again
(pretraining resumes from its work folder's checkpoint; a transfer job reuses its feature cache).
Every job writes its state to ``<sweep>/status/<job>.json``; ``--status`` reads those and the
scheduler's queue. When all jobs are done, the leaderboard of the plan's cards and tasks is printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ringbench.cli import add_common_flags, run_main, sigterm_as_interrupt
from ringbench.config import find_config
from ringbench.errors import UserError
from ringbench.fileio import atomic_write_text, check_writable_dir, folder_lock
from sweep.expand import Job, card_sha256, expand, mark_existing
from sweep.folders import prepare_sweep_folders
from sweep.plan import Layout, Resources, load_plan
from sweep.schedule import EXECUTORS, Sweep, resolve_executor
from sweep.status import orphans, status_rows


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


def main(argv: Sequence[str] | None = None) -> int:
    """``--status``, or: load the plan, expand it, skip what exists, then list (``--dry-run``) or run the jobs."""
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
    check_writable_dir(layout.results, "--results")
    check_writable_dir(layout.workdir, "--workdir")
    executor = resolve_executor(args.executor)
    if args.dry_run:
        _mark(jobs, layout, args)
        rows = [
            [
                j.key,
                j.skip_reason or "submit",
                _after_text(j),
                _resource_text(j.resources),
                j.stage,
                " ".join(j.argv),
            ]
            for j in jobs
        ]
        print(tabulate(rows, headers=["job", "action", "after", "resources", "stage", "arguments"]))
        return 0
    prepare_sweep_folders(layout)  # owner-only, or refused: what it holds runs as code
    with folder_lock(layout.sweep_dir, "sweep folder"):  # one controller at a time
        return _run(args, plan_path, plan, jobs, layout, executor)


def _run(args: argparse.Namespace, plan_path: Path, plan: dict, jobs: list[Job], layout: Layout, executor: str) -> int:
    """Submit what is not done (none of what an earlier controller left running), follow it, print the table and
    end with the failed jobs named."""
    still = orphans(layout)
    if still:
        raise UserError(
            f"{len(still)} job(s) of an earlier run of this sweep still run: {', '.join(still[:5])}; wait for them "
            "(--status) or stop them (kill PID, scancel ID), then run again"
        )
    _mark(jobs, layout, args)
    todo = [j for j in jobs if not j.skip_reason]
    print(
        f"sweep {plan_path.stem}: {len(jobs)} jobs, {len(todo)} to run, {len(jobs) - len(todo)} done already; "
        f"executor {executor}; folder {layout.sweep_dir}",
        file=sys.stderr,
    )
    sweep = Sweep(jobs, layout, plan, executor, plan_path.stem, parallel=args.jobs)
    if executor in ("local", "debug"):
        try:
            with sigterm_as_interrupt():  # `kill` or a scheduler's timeout stops the jobs too, as Ctrl-C does
                sweep.run_local(progress=True)
        except KeyboardInterrupt:
            print(f"stopped; {sweep.failures()}", file=sys.stderr)
            return 130
    else:
        sweep.run_slurm()
        if args.no_wait:
            print(f"submitted; follow with: python -m sweep --plan {args.plan} --status", file=sys.stderr)
            return 0
        sweep.wait(progress=True)
    sweep.save()
    if not args.no_table:
        print_table(jobs, layout)
    failures = sweep.failures()
    if failures:
        raise UserError(failures)
    return 0


def _mark(jobs: list[Job], layout: Layout, args: argparse.Namespace) -> None:
    """Skip what exists; with ``--retry-failed`` also what did not fail (or was not cancelled) last time."""
    mark_existing(jobs, layout.results, force=args.force)
    if args.retry_failed:
        failed_before = {r[0] for r in status_rows(layout) if r[1] in ("failed", "cancelled")}
        for job in jobs:
            if not job.skip_reason and not {job.key, *job.needs()} & failed_before:
                job.skip_reason = "not failed"


def _after_text(job: Job) -> str:
    """What a job waits for, in a ``--dry-run`` row: its card's job and how many grid point jobs."""
    points = f"{len(job.after)} grid point job(s)" if job.after else ""
    return " + ".join(t for t in (job.depends_on or "", points) if t)


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
    stored = load_records(layout.results) if layout.results.is_dir() else []  # none yet: every job failed
    records = [r for r in stored if r.get("backbone_sha256") in cards and r["task"] in tasks]
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
