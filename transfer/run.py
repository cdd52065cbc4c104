"""Evaluate one backbone on one downstream task and write its result record.

    python transfer/run.py --backbone ring_moco.pth --task coco_det
    python transfer/run.py --backbone ring_moco.pth --task fewshot_digits --probe logreg
    python transfer/run.py --list-tasks

The backbone may be a ringbench card or any format ``transfer.checkpoints`` reads. A run whose
record already exists (same backbone hash, task and config hash) is skipped unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run by path: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringbench.cli import add_common_flags, resolve_device, run_main
from ringbench.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from transfer.tasks import all_tasks

    parser = argparse.ArgumentParser(
        prog="transfer/run.py",
        description="Evaluate a pretrained backbone on one transfer task (Detectron2 detection/segmentation/"
        "keypoints, Meta-Dataset few-shot, linear evaluation) and write one result record to the results store.",
        epilog="Tasks: `--list-tasks`. Records: <results>/<task>/<sha256>-<config hash>.json; "
        "tables: transfer/leaderboard.py.",
    )
    parser.add_argument(
        "--backbone",
        type=Path,
        help="checkpoint: a ringbench card (.pth) or any format of docs/formats.md (MoCo, VISSL, solo-learn, "
        "mmselfsup, DINO, SwAV, BYOL .pkl, Detectron2 .pkl, ...), or zoo:NAME (a fetched ringbench-zoo entry)",
    )
    parser.add_argument("--task", help="task name (see --list-tasks)")
    parser.add_argument("--name", help="backbone name in results (default: the file's stem)")
    parser.add_argument("--arch", help="architecture, only for timm checkpoints that do not record it")
    parser.add_argument(
        "--results",
        type=Path,
        default=Path("results"),
        help="results folder: one JSON file per record (default: %(default)s)",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=Path("runs"), help="where tasks keep logs and weights (default: %(default)s)"
    )
    parser.add_argument("--cache-dir", type=Path, default=Path("cache"), help="feature caches (default: %(default)s)")
    parser.add_argument("--data-root", type=Path, help="dataset root (else the task's environment variable)")
    parser.add_argument(
        "--device", default="auto", help="'auto' (CUDA when present; the default), 'cpu', 'cuda', 'cuda:1'"
    )
    parser.add_argument("--force", action="store_true", help="run even if a record with this config exists")
    parser.add_argument(
        "--no-tensorboard",
        action="store_true",
        help="tasks that train (Detectron2, fine-tuning) write no TensorBoard event files (written into their output "
        "folder)",
    )
    parser.add_argument(
        "--grid-point",
        metavar="NAME",
        help="tasks that search a grid (finetune_*): run this point only and write no record (a sweep runs each "
        "point as its own job; the task's run without it reuses the finished points); --print-config lists them",
    )
    parser.add_argument(
        "--keep-grid-points",
        action="store_true",
        help="with --force on a task that searches a grid: write the record again but reuse the points' finished "
        "results (a sweep's task job, after its points' own --force jobs)",
    )
    parser.add_argument("--list-tasks", action="store_true", help="list the tasks and exit")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the task's resolved config (Detectron2 tasks: the full Detectron2 config) and exit; needs no data",
    )
    # with --list-tasks: refresh the generated task tables of a page (make readme)
    parser.add_argument("--readme", type=Path, help=argparse.SUPPRESS)
    add_common_flags(parser)
    family_flags: dict[object, dict[str, str]] = {}
    for task in all_tasks().values():
        if task.add_arguments is not None and task.add_arguments not in family_flags:
            before = set(parser._option_string_actions)
            task.add_arguments(parser)
            family_flags[task.add_arguments] = {
                parser._option_string_actions[flag].dest: flag for flag in set(parser._option_string_actions) - before
            }
    parser.set_defaults(_family_flags=family_flags)
    return parser


def refuse_foreign_flags(args: argparse.Namespace, task) -> None:
    """Flags that ``task`` does not use (another family's, or its ``unused_flags``) are refused, not
    silently ignored (``--seeds 3`` on a few-shot task would otherwise record one seed as if three were asked)."""
    own = {dest for dest in args._family_flags.get(task.add_arguments, {}) if dest not in task.unused_flags}
    foreign = sorted(
        {
            flag
            for flags in args._family_flags.values()
            for dest, flag in flags.items()
            if dest not in own and getattr(args, dest, None) is not None
        }
    )
    if foreign:
        raise UserError(f"{', '.join(foreign)}: not used by task {task.name} ({task.family}); see --help")


def list_tasks(tablefmt: str = "simple") -> str:
    """The registry as a table; ``tablefmt="github"`` gives the task list of docs/tasks.md."""
    from tabulate import tabulate

    from transfer.tasks import all_tasks

    rows = [(t.name, t.family, "no" if t.needs_data else "yes", t.description) for t in all_tasks().values()]
    return tabulate(
        rows, headers=["task", "family", "runs with no data on disk", "what it measures"], tablefmt=tablefmt
    )


def list_families(tablefmt: str = "simple") -> str:
    """One row per task family: its tasks, and those of them that run on embedded data (the README's summary)."""
    from tabulate import tabulate

    from transfer.tasks import all_tasks

    families: dict[str, list] = {}
    for t in all_tasks().values():
        families.setdefault(t.family, []).append(t)
    rows = [
        (family, len(tasks), ", ".join(t.name for t in tasks if not t.needs_data) or "none")
        for family, tasks in sorted(families.items())
    ]
    return tabulate(rows, headers=["family", "tasks", "of them on embedded data (nothing on disk)"], tablefmt=tablefmt)


def generated_block(name: str) -> str:
    """A generated block of the documentation, between its markers: ``tasks`` (every task, docs/tasks.md) or
    ``task-families`` (one row per family, the README)."""
    table = {"tasks": list_tasks, "task-families": list_families}[name]("github")
    return f"<!-- {name}:begin -->\n{table}\n<!-- {name}:end -->"


def write_generated_blocks(path: Path) -> None:
    """Replace every generated block in ``path`` (README.md, docs/tasks.md) with the registry's (``make readme``)."""
    from ringbench.fileio import atomic_write_text

    text = path.read_text()
    found = False
    for name in ("tasks", "task-families"):
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        start, stop = text.find(begin), text.find(end)
        if start >= 0 and stop > start:
            text = text[:start] + generated_block(name) + text[stop + len(end) :]
            found = True
    if not found:
        raise UserError(f"{path}: no <!-- tasks:begin --> or <!-- task-families:begin --> block")
    atomic_write_text(path, text)


def existing_record(args: argparse.Namespace, backbone_sha256: str, config: dict | None = None) -> dict | None:
    """The record this run would be skipped for: same backbone hash, task and config hash (or None)."""
    from ringbench.records import config_hash
    from ringbench.store import find_record
    from transfer.tasks import get_task

    if config is None:
        config = get_task(args.task).make_config(args)
    return find_record(args.results, backbone_sha256, args.task, config_hash(config))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_tasks and args.readme:
        write_generated_blocks(args.readme)
        return 0
    if args.list_tasks:
        print(list_tasks())
        return 0
    if args.backbone is None or args.task is None:
        raise UserError("--backbone and --task are required (see --help; --list-tasks lists tasks)")

    device = resolve_device(args.device)  # first: a bogus device wastes nothing

    from ringbench.fileio import check_writable_dir, remove_stale_temps
    from ringbench.records import config_hash, engine_versions_now, make_record
    from ringbench.store import write_record
    from transfer.checkpoints import load_backbone
    from transfer.tasks import TaskContext, check_grid_point, get_task, run_dir

    task = get_task(args.task)
    refuse_foreign_flags(args, task)
    if args.results.suffix == ".jsonl":
        raise UserError(f"--results {args.results}: results are written to a folder; .jsonl files are only read")
    for folder, flag in (
        (args.results, "--results"),
        (args.output_dir, "--output-dir"),
        (args.cache_dir, "--cache-dir"),
    ):
        check_writable_dir(folder, flag)
    backbone = load_backbone(args.backbone, name=args.name, arch=args.arch)
    config = task.make_config(args)
    cfg_hash = config_hash(config)
    device = resolve_device(args.device)
    launch = task.make_launch(args, device) if task.make_launch else None
    if args.print_config:
        ctx = TaskContext(
            output_dir=run_dir(args.output_dir, backbone.name, backbone.sha256, task.name, config),
            device=device,
            launch=launch,
        )
        print(task.describe_config(backbone, config, ctx) if task.describe_config else json.dumps(config, indent=1))
        if task.grid_points is not None:
            print("grid points (--grid-point): " + " ".join(task.grid_points(config)))
        return 0
    check_grid_point(task, config, args.grid_point, args.keep_grid_points)
    existing = existing_record(args, backbone.sha256, config)
    if existing and not args.force:
        print(
            f"skipped: {backbone.name} on {task.name} (config {cfg_hash}) is already in {args.results}; "
            f"--force to run again"
        )
        print(format_metrics(existing))
        return 0
    from ringbench.store import record_target_problem

    problem = record_target_problem(args.results, backbone.sha256, task.name, cfg_hash)
    if problem:
        raise UserError(problem)  # before any work: the record could not be written at the end
    task.validate(backbone, config)
    ctx = TaskContext(
        output_dir=run_dir(args.output_dir, backbone.name, backbone.sha256, task.name, config),
        device=device,
        data_root=args.data_root,
        cache_dir=args.cache_dir,
        debug=args.debug,
        force=args.force,
        tensorboard=not args.no_tensorboard,
        launch=launch,
        grid_point=args.grid_point,
        keep_grid_points=args.keep_grid_points,
        options=task.make_options(args) if task.make_options else {},
    )
    check_writable_dir(ctx.output_dir, "--output-dir")
    check_writable_dir(args.results / task.name, "--results")
    remove_stale_temps(ctx.output_dir, recursive=True)  # left by killed runs (per-seed folders too)
    remove_stale_temps(args.results / task.name)
    print(
        f"{task.name}: {backbone.name} ({backbone.arch}, {backbone.source_format}, sha256 {backbone.sha256[:12]}) "
        f"on {ctx.device}; output {ctx.output_dir}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    result = task.run(backbone, config, ctx)
    if args.grid_point is not None:
        print(f"{task.name}: grid point {args.grid_point} done; the task's run without --grid-point writes the record")
        return 0
    if not result.write_record:
        print(f"{task.name}: this machine's part is done; machine 0 writes the record", file=sys.stderr)
        return 0
    record = make_record(
        backbone=backbone.name,
        backbone_sha256=backbone.sha256,
        task=task.name,
        metrics=result.metrics,
        ci95=result.ci95,
        seeds=result.seeds,
        config=config,
        engine_versions={**engine_versions_now(), **result.engine_versions},
        wall_s=time.perf_counter() - start,
        units=result.units,
        headline=task.headline_metrics,
        family=task.family,
        backbone_meta={
            "arch": backbone.arch,
            "stem": backbone.stem,
            "source_format": backbone.source_format,
            **_meta_summary(backbone.meta),
        },
        extra=result.extra,
    )
    path = write_record(args.results, record)
    print(format_metrics(record))
    print(f"record written to {path}", file=sys.stderr)
    return 0


def _meta_summary(meta: dict) -> dict:
    """The card metadata a leaderboard needs: method, loss and its parameters, data, epochs, the
    pretraining seed and config (cards whose configs differ only in the seed form a recipe) and
    when the card was made, and the published checkpoint it was converted from (``source_name``: its published
    row sits beside it)."""
    keys = (
        "method",
        "loss",
        "loss_params",
        "dataset",
        "epochs",
        "streams",
        "image_size",
        "seed",
        "config",
        "created",
        "source_name",
    )
    return {k: meta[k] for k in keys if k in meta}


def format_metrics(record: dict) -> str:
    from tabulate import tabulate

    ci = record.get("ci95") or {}
    rows = [
        (k, f"{v:.3f}" if isinstance(v, float) else v, f"± {ci[k]:.3f}" if k in ci else "")
        for k, v in record["metrics"].items()
    ]
    title = f"{record['backbone']} / {record['task']}"
    return title + "\n" + tabulate(rows, headers=["metric", "value", "ci95"])


def cli() -> None:
    """Console-script entry point (see pyproject.toml)."""
    sys.exit(run_main(main))


if __name__ == "__main__":
    cli()
