"""A plan expanded into jobs: one pretraining job per recipe and seed, one transfer job per card and task, each
checked before anything is submitted; :func:`mark_existing` marks the jobs whose result is there already."""

from __future__ import annotations

import argparse
import functools
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ringbench.config import find_config
from ringbench.errors import UserError
from ringbench.fileio import path_component
from sweep.plan import Layout, Resources, parse_resources


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
        resources = parse_resources(entry["resources"], f"{where}.resources")
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
        resources = parse_resources(settings.pop("resources", None), f"plan tasks.{task}.resources")
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
