"""A plan expanded into jobs: one pretraining job per recipe and seed, one transfer job per card and task, all
checked before anything is submitted; :func:`mark_existing` marks the jobs whose result is there already.

The stages are asked library questions (:mod:`pretrain.recipe`, :mod:`transfer.resolve`), never handed a
command line to parse back. A task's config is the same for every card, so it is resolved and hashed once per
(task, flags): a plan of thousands of cards costs about what one card does. A task whose config has a grid
(:func:`transfer.resolve.task_grid_points`, asked as often) gets one job per card and point
(``<task>/<card>/<point>``, ``--grid-point``), and its own job per card runs after them (``Job.after``).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ringbench.config import find_config
from ringbench.errors import UserError
from ringbench.fileio import path_component
from sweep.plan import Layout, Resources, parse_resources
from transfer.resolve import flag_argv, task_config, task_grid_points

# transfer/run.py flags a sweep sets itself (from --workdir, --results, --device, resources and the card), or that
# would make a job do something else than run: a plan that sets them is refused
OWNED_TASK_FLAGS = (
    "backbone", "task", "name", "results", "output_dir", "cache_dir", "device", "force", "list_tasks",
    "print_config", "readme", "debug", "num_gpus", "num_machines", "machine_rank", "dist_url", "grid_point",
    "keep_grid_points",
)  # fmt: skip
OWNED_PRETRAIN_FLAGS = ("--config", "--out", "--workdir", "--device", "--seed", "--fresh", "--print-config")
CARD_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".pkl")  # what transfer/run.py reads as a card or checkpoint


@dataclass
class Recipe:
    """What a pretraining job trains: its config file, ``pretrain/run.py`` arguments (flags and ``key=value``
    overrides) and seed (None: the config's)."""

    config: str
    args: list[str] = field(default_factory=list)
    seed: Optional[int] = None


@dataclass
class Job:
    """One stage run: ``python <stage>/run.py <argv>`` as a submitit job."""

    key: str  # unique in the sweep: "pretrain/<card>", "<task>/<card>" or "<task>/<card>/<grid point>"
    stage: str  # "pretrain" | "transfer"
    argv: list[str]
    card: str  # the card file this job writes (pretrain) or reads (transfer)
    resources: Resources
    depends_on: Optional[str] = None  # key of the pretrain job that makes the card
    skip_reason: str = ""  # set when its result already exists
    task: Optional[str] = None  # transfer jobs: the task and its resolved config's hash (the record's identity)
    config_hash: Optional[str] = None
    recipe: Optional[Recipe] = None  # pretraining jobs: what the card is made from
    grid_point: Optional[str] = None  # a grid point's job: the point it runs (--grid-point)
    after: list[str] = field(default_factory=list)  # a grid task's own job: the keys of its point jobs

    def needs(self) -> list[str]:
        """The keys of the jobs this one waits for: its card's pretraining job, then its grid points' jobs."""
        return [*([self.depends_on] if self.depends_on else []), *self.after]


def expand(plan: dict[str, Any], layout: Layout, device: str, quick: bool = False) -> list[Job]:
    """Every job of the plan, pretraining first; checked (tasks, cards, globs, recipes, flags, resources)."""
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
            _refuse_non_cards(matched, where, entry["path"])
            cards += [(m, None) for m in matched]
            continue
        for job in _recipe_jobs(entry, where, plan, layout, device):
            jobs.append(job)
            cards.append((Path(job.card), job.key))
    twice = sorted(name for name, count in Counter(c.stem for c, _ in cards).items() if count > 1)
    if twice:
        raise UserError(f"plan: several cards are named {twice}; card names (file stems) must be unique")
    for task, settings in plan["tasks"].items():
        if settings is not None and not isinstance(settings, dict):
            raise UserError(f"plan tasks.{task}: expected a mapping of flags, got {type(settings).__name__}")
        settings = dict(settings or {})
        if not all(isinstance(k, str) for k in settings):
            raise UserError(f"plan tasks.{task}: flags must be names")
        check_task_settings(task, settings)
        resources = parse_resources(settings.pop("resources", None), f"plan tasks.{task}.resources")
        if resources.nodes > 1 and tasks[task].family != "detectron2":
            raise UserError(f"plan tasks.{task}.resources: nodes > 1 needs a Detectron2 task (multi-machine launch)")
        if not cards:
            continue
        try:  # flags parse and configs resolve before anything is submitted, once per (task, flags)
            config, digest = task_config(task, settings)
            points = _grid_points(task, config)
        except UserError as exc:
            raise UserError(f"plan job {task}/{cards[0][0].stem}: {exc}") from exc
        # --num-gpus: the Detectron2 family's launcher; the other families run on one device
        gpus = ["--num-gpus", str(resources.gpus)] if resources.gpus and tasks[task].family == "detectron2" else []
        # several nodes: machine rank and rendezvous come from the job environment (StageJob)
        nodes = ["--num-machines", str(resources.nodes)] if resources.nodes > 1 else []
        common = [
            *["--results", str(layout.results), "--output-dir", str(layout.runs / "transfer")],
            *["--cache-dir", str(layout.cache), "--device", "cuda" if resources.gpus else device],
            *gpus,
            *nodes,
            *flag_argv(settings),
        ]
        for card, maker in cards:
            job = Job(
                f"{task}/{card.stem}",
                "transfer",
                ["--backbone", str(card), "--task", task, *common],
                str(card),
                resources,
                depends_on=maker,
                task=task,
                config_hash=digest,
            )
            for point in points:  # each point alone, then the task's own job, which reuses them and writes the record
                key = f"{job.key}/{point}"
                argv = [*job.argv, "--grid-point", point]
                jobs.append(dataclasses.replace(job, key=key, argv=argv, grid_point=point, after=[]))
                job.after.append(key)
            jobs.append(job)
    _refuse_shared_state_files(jobs)
    return jobs


def _recipe_jobs(entry: dict[str, Any], where: str, plan: dict[str, Any], layout: Layout, device: str) -> list[Job]:
    """The pretraining jobs of a recipe entry, one per seed; its arguments are checked once (first seed)."""
    from pretrain.recipe import recipe_config

    if not entry["config"]:
        raise UserError(f"{where}: recipe {entry['name']!r} needs a pretraining 'config'")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", entry["name"]):
        raise UserError(f"{where}: recipe name {entry['name']!r} may hold only letters, digits, '_', '.', '-'")
    path_component(entry["name"], f"{where}: recipe name")  # not '..', not hidden: a folder of its own
    config = find_config(entry["config"], "pretrain")
    resources = parse_resources(entry["resources"], f"{where}.resources")
    args = [*map(str, plan["pretrain_args"]), *map(str, entry["args"])]
    negative = [seed for seed in entry["seeds"] or [] if seed < 0]
    if negative:
        raise UserError(f"{where}: pretraining seeds must be >= 0, got {negative}")
    owned = sorted({a.split("=")[0] for a in args if a.split("=")[0] in OWNED_PRETRAIN_FLAGS})
    if owned:
        raise UserError(f"{where}: {', '.join(owned)} is set by the sweep (seeds, --workdir, --device), not in args")
    seeds = entry["seeds"] or [None]
    try:
        recipe_config(config, args, seeds[0])  # bad flags, keys and values now, not in the job
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from exc
    jobs = []
    for seed in seeds:
        stem = entry["name"] if seed is None else f"{entry['name']}_s{seed}"
        card = layout.cards / f"{stem}.pth"
        argv = [
            *["--config", str(config), "--out", str(card), "--workdir", str(layout.runs / "pretrain" / stem)],
            *["--device", "cuda" if resources.gpus else device],
            *args,
            *(["--seed", str(seed)] if seed is not None else []),
            "--no-progress",
        ]
        recipe = Recipe(str(config), args, seed)
        jobs.append(Job(f"pretrain/{stem}", "pretrain", argv, str(card), resources, recipe=recipe))
    return jobs


def _grid_points(task: str, config: dict[str, Any]) -> list[str]:
    """The task's grid points with ``config`` (``[]``: no grid), checked: each a distinct name that can be a job's
    key, a file name and one argument."""
    points = task_grid_points(task, config)
    bad = [p for p in points if not isinstance(p, str) or not re.fullmatch(r"[A-Za-z0-9_.=+-]+", p)]
    if bad or len(set(points)) != len(points):
        raise UserError(
            f"task {task}: its grid points must be distinct names of letters, digits and '_.=+-', got "
            f"{(bad or points)[:5]!r}"
        )
    return list(points)


def _refuse_shared_state_files(jobs: list[Job]) -> None:
    """Two jobs whose keys map to one state file (``a/b__c`` and ``a/b/c``) are a one-line error naming them."""
    names = Counter(job.key.replace("/", "__") for job in jobs)
    clash = sorted(job.key for job in jobs if names[job.key.replace("/", "__")] > 1)
    if clash:
        raise UserError(f"plan: jobs {clash[:4]} would share one state file; rename the cards ('__' in a card name)")


def check_task_settings(task: str, settings: dict[str, Any]) -> None:
    """A task's plan settings against ``transfer/run.py``'s parser, before they become a command line: flags the
    sweep owns are refused, a switch takes true or false, a one-value flag a scalar (not a list or mapping), a
    many-value flag a list of scalars; argparse then checks each value's type (:func:`task_config`)."""
    from transfer.run import build_parser

    actions = build_parser()._option_string_actions
    for key, value in settings.items():
        name = key.replace("-", "_")
        where = f"plan tasks.{task}.{key}"
        if name in OWNED_TASK_FLAGS:
            raise UserError(
                f"{where}: --{name.replace('_', '-')} is set by the sweep (from its own flags, the plan's cards "
                "and resources); leave it out of the plan"
            )
        if name == "resources":
            continue
        action = actions.get("--" + name.replace("_", "-"))
        if action is None:
            continue  # task_config names it as an unrecognized argument
        scalar = (str, int, float)
        if action.nargs == 0:
            ok, expected = isinstance(value, bool) or value is None, "true or false"
        elif action.nargs in (None, "?"):
            ok, expected = value is None or (isinstance(value, scalar) and not isinstance(value, bool)), "one value"
        else:
            items = value if isinstance(value, list) else [value]
            ok = all(isinstance(v, scalar) and not isinstance(v, bool) for v in items)
            expected = "a value or a list of values"
        if not ok:
            raise UserError(f"{where}: expected {expected}, got {type(value).__name__} {value!r}")


def _refuse_non_cards(matched: list[Path], where: str, pattern: str) -> None:
    """Files a backbone glob matched that cannot be cards (another suffix, or empty) are one line, not a job
    that fails later."""
    bad = [m.name for m in matched if not m.name.endswith(CARD_SUFFIXES) or m.stat().st_size == 0]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UserError(
            f"{where}: {pattern!r} matches files that are not cards: {shown} (a card is a non-empty "
            f"{', '.join(CARD_SUFFIXES)} file); narrow the pattern"
        )


def mark_existing(jobs: list[Job], results: Path, force: bool = False) -> None:
    """Set ``skip_reason`` on jobs whose result exists: a card made with its recipe's config, a record
    with the job's identity in ``results`` (the lookup ``transfer/run.py`` makes before it runs). A grid point's
    job has its task's identity: with the task's record there, its points are not run either."""
    from pretrain.recipe import card_changes, recipe_config
    from ringbench.store import find_record

    fresh: set[str] = set()
    found: dict[tuple[str, str, str], bool] = {}  # asked once per record, not once per grid point
    for job in jobs:
        if job.stage == "pretrain":
            assert job.recipe is not None  # set by expand()
            changed = None
            if Path(job.card).exists():
                changed = card_changes(job.card, recipe_config(job.recipe.config, job.recipe.args, job.recipe.seed))
            if changed == []:
                job.skip_reason = "card exists"
            else:
                fresh.add(job.key)
                if changed:  # made with another config: its checkpoints are stale too
                    job.argv.append("--fresh")
        elif not force and job.depends_on not in fresh and Path(job.card).is_file():
            assert job.task is not None and job.config_hash is not None  # set by expand()
            identity = (card_sha256(job.card), job.task, job.config_hash)
            if identity not in found:
                found[identity] = bool(find_record(results, *identity))
            if found[identity]:
                job.skip_reason = "record exists"
        if force and job.stage == "transfer" and "--force" not in job.argv:
            job.argv.append("--force")
            if job.after:  # its points were just run again by their own jobs: rewrite the record from them
                job.argv.append("--keep-grid-points")


@functools.lru_cache(maxsize=4096)
def _sha256_of(path: str, mtime_ns: int, size: int) -> str:
    from ringbench.fileio import sha256_file

    return sha256_file(path)


def card_sha256(path: str | os.PathLike) -> str:
    """A card's SHA-256, hashed once per version of the file (cards are large; a sweep asks twice)."""
    stat = os.stat(path)
    return _sha256_of(os.fspath(path), stat.st_mtime_ns, stat.st_size)
