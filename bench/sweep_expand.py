"""Sweep expansion speed: jobs per second of a plan of one recipe x the six embedded tasks.

    python bench/sweep_expand.py [--rounds 3] [--per-job-jobs 280]

The plan (written in a temporary folder) has one pretraining recipe with N seeds and the six tasks that need
no data, so 7 N jobs: 2,800 (400 seeds) and 28,000 (4,000 seeds). Each is expanded (``sweep.expand.expand``)
and checked for finished work (``mark_existing``), which is what ``python -m sweep --dry-run`` does before it
prints. The expansion resolves each task's config once (``transfer.resolve.task_config``); against it runs the
path where every transfer job resolves its own config, as the sweep did before, on ``--per-job-jobs`` jobs (its
cost grows with the jobs: the full 2,800 would take about 25 s on 2 cores). They alternate over ``--rounds``
rounds (``bench/interleave.py``); medians are compared. Target: 2,800 jobs in under 2 s.

Ratios are measured in this one run and printed, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run by path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from ringbench.cli import add_common_flags, run_main
from ringbench.errors import UserError

TASKS = ("fewshot_digits", "fewshot_synthetic", "linear_synthetic", "syn_det", "syn_instseg", "syn_kp")


def write_plan(folder: Path, seeds: int) -> Path:
    """One recipe with ``seeds`` pretraining seeds x the embedded tasks: ``7 * seeds`` jobs."""
    plan = {
        "pretrain_args": ["--data", "synthetic", "--profile", "demo"],
        "backbones": [{"name": "ring", "config": "moco_ring", "seeds": list(range(seeds))}],
        "tasks": {task: {} for task in TASKS},
    }
    path = folder / f"plan_{seeds}.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--per-job-jobs", type=int, default=280, help="jobs of the per-job path (a multiple of 7)")
    add_common_flags(parser)
    args = parser.parse_args(argv)
    if args.per_job_jobs < 7 or args.per_job_jobs % 7:
        raise UserError(f"--per-job-jobs must be a positive multiple of 7, got {args.per_job_jobs}")

    from bench.interleave import interleaved, machine_line
    from sweep.expand import Job, expand, mark_existing
    from sweep.plan import Layout, load_plan
    from transfer.resolve import task_config

    with tempfile.TemporaryDirectory(prefix="ringbench-bench-") as tmp:
        work = Path(tmp)
        layout = Layout(work, work / "results", work / "sweeps" / "plan")
        plans = {n: load_plan(write_plan(work, n // 7)) for n in (2_800, 28_000, args.per_job_jobs)}

        def shared(n: int) -> list[Job]:
            jobs = expand(plans[n], layout, "cpu")
            mark_existing(jobs, layout.results)
            assert len(jobs) == n
            return jobs

        def per_job() -> None:
            plan = plans[args.per_job_jobs]
            for job in shared(args.per_job_jobs):
                if job.stage == "transfer":
                    assert job.task is not None
                    task_config(job.task, plan["tasks"][job.task])

        medians = interleaved(
            {"2800": lambda: shared(2_800), "28000": lambda: shared(28_000), "per job": per_job}, args.rounds
        )
        rate = {"2800": 2_800 / medians["2800"], "28000": 28_000 / medians["28000"]}
        per_job_rate = args.per_job_jobs / medians["per job"]
        print(f"sweep expansion: one recipe x {len(TASKS)} embedded tasks, median of {args.rounds} interleaved rounds")
        print(f"   2,800 jobs   {medians['2800']:7.2f} s   {rate['2800']:9,.0f} jobs/s   (target: under 2 s)")
        print(f"   28,000 jobs  {medians['28000']:7.2f} s   {rate['28000']:9,.0f} jobs/s")
        print(
            f"   each job resolving its own config ({args.per_job_jobs} jobs): {medians['per job']:.2f} s, "
            f"{per_job_rate:,.0f} jobs/s -> resolving once per (task, flags) is {rate['2800'] / per_job_rate:.0f}x "
            "faster at 2,800 jobs"
        )
        print(f"   {machine_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
