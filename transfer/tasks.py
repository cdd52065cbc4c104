"""The task registry: ``name -> Task``.

A task evaluates one backbone on one downstream problem and returns metrics. Task families
register themselves from their own modules (listed in ``_TASK_MODULES``) so that importing
the registry is cheap and a family whose dependencies are missing fails only when used.

Contract, used by ``transfer/run.py``:

* ``task.add_arguments(parser)`` (optional) adds task-family flags to the shared CLI.
* ``task.make_config(args) -> dict``: every setting that changes the result, resolved to plain
  JSON values. Its hash is part of a record's identity (a rerun with the same backbone, task
  and config is skipped unless ``--force``).
* ``task.validate(backbone, config)``: raise :class:`pretrain.cli.UserError` on anything that
  would fail later (unsupported arch, missing data files), before any work starts.
* ``task.run(backbone, config, ctx) -> TaskResult``.
* Optional: ``describe_config`` (``--print-config``) and ``make_launch`` (several processes or machines:
  the launch goes to ``ctx.launch``, outside the config and so outside the record's identity).
* Optional: ``make_options(args) -> dict``: settings that change how a run goes but not its result (data-loading
  processes, the checkpoint interval), in ``ctx.options``: outside the config, so outside the record's identity.
* Optional: ``grid_points(config) -> [name, ...]``: a task that searches a grid (fine-tuning's learning rate x
  weight decay) names its points. ``transfer/run.py --grid-point NAME`` runs one point alone (``ctx.grid_point``;
  no record; a sweep makes one job of each, then the task's own job, which reuses the finished points, chooses
  and writes the one record). Without ``--grid-point`` the task runs every point itself. ``ctx.force`` runs a point
  again (its own job, or the task's run without ``--grid-point``); with ``ctx.keep_grid_points`` too the task's run
  reuses finished points (a forced sweep's task job, after its forced point jobs).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ringbench.errors import UserError

# Modules that call ``register`` at import time, one per task family, with the optional
# dependencies whose absence only hides that family (any other missing module is a bug and raises).
_TASK_MODULES: dict[str, tuple[str, ...]] = {
    "transfer.d2.tasks": ("detectron2", "fvcore", "pycocotools"),
    "transfer.fewshot": (),
    "transfer.finetune": (),
    "transfer.knn": (),
    "transfer.linear": (),
    "transfer.svm": (),
    "transfer.kornblith": (),
    "transfer.cdfsl": (),
}


@dataclass
class TaskResult:
    """What a task returns; ``transfer/run.py`` turns it into a result record."""

    metrics: dict[str, float]
    ci95: dict[str, float] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. per-seed metrics, skipped images
    engine_versions: dict[str, str] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)  # a metric's unit if not percentage points
    write_record: bool = True  # False on machines other than machine 0 of a multi-machine run (0 writes it)


def run_dir(root: Path, backbone_name: str, backbone_sha256: str, task: str, config: dict[str, Any]) -> Path:
    """The output folder of one run: ``<root>/<backbone name>-<sha256[:8]>/<task>/<config hash>``."""
    from ringbench.records import config_hash

    return Path(root) / f"{backbone_name}-{backbone_sha256[:8]}" / task / config_hash(config)


@dataclass
class TaskContext:
    """Where a task may write (its own output folder, from :func:`run_dir`) and how it should run."""

    output_dir: Path
    device: str = "cpu"
    data_root: Path | None = None
    cache_dir: Path | None = None
    debug: bool = False
    force: bool = False  # --force: start again (no reuse of finished seeds or checkpoints)
    tensorboard: bool = True  # tasks that train (Detectron2) write TensorBoard events; --no-tensorboard: not
    launch: Any = None  # multi-process families (Detectron2): the resolved launch (transfer.d2.launch.Launch)
    grid_point: str | None = None  # --grid-point: run this point of the task's grid only (Task.grid_points)
    keep_grid_points: bool = False  # --keep-grid-points: with force, reuse the finished points, redo the rest
    options: dict[str, Any] = field(default_factory=dict)  # Task.make_options: how to run, not what (no identity)

    @property
    def feature_cache_dir(self) -> Path:
        """Where frozen features are cached: ``cache_dir``, else the run's own folder."""
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "cache"

    def features(self, backbone: Any, image_set: Any, image_size: int | None, pooling: str, **options: Any) -> Any:
        """``metadataset.features.cached_features`` for this run: its feature cache, its device, a progress bar
        unless ``--debug`` (``options``: ``resize``, ``build_model``)."""
        from metadataset.features import cached_features

        return cached_features(
            backbone,
            image_set,
            self.feature_cache_dir,
            image_size=image_size,
            pooling=pooling,
            device=self.device,
            progress=not self.debug,
            **options,
        )

    def output_dir_for(self, config: dict[str, Any]) -> Path:
        """The output folder of the run of the same backbone and task with another ``config``."""
        from ringbench.records import config_hash

        return Path(self.output_dir).parent / config_hash(config)


@dataclass
class Task:
    name: str
    family: str  # "detectron2" | "fewshot" | "knn" | "linear" | "svm"
    description: str
    make_config: Callable[[argparse.Namespace], dict[str, Any]]
    run: Callable[[Any, dict[str, Any], TaskContext], TaskResult]
    validate: Callable[[Any, dict[str, Any]], None] = lambda backbone, config: None
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    primary_metric: str = ""
    headline: tuple[str, ...] = ()  # metrics a table shows by default (else primary_metric); in each record
    needs_data: bool = False  # False: runs on an embedded default with nothing on disk
    unused_flags: tuple[str, ...] = ()  # its family's flags this task ignores: refused when given
    # --print-config: the engine's resolved config as text (default: the task config as JSON)
    describe_config: Callable[[Any, dict[str, Any], TaskContext], str] | None = None
    # the launch of a multi-process family from the CLI flags and the device (None: one process)
    make_launch: Callable[[argparse.Namespace, str], Any] | None = None
    # the names of the points of the grid a config searches, each runnable alone by --grid-point (None: no grid)
    grid_points: Callable[[dict[str, Any]], list[str]] | None = None
    # settings that change how a run goes but not its result (ctx.options; not in the config)
    make_options: Callable[[argparse.Namespace], dict[str, Any]] | None = None

    @property
    def headline_metrics(self) -> tuple[str, ...]:
        return self.headline or ((self.primary_metric,) if self.primary_metric else ())


_REGISTRY: dict[str, Task] = {}
_LOADED = False
_LOAD_ERRORS: dict[str, str] = {}


def register(task: Task) -> Task:
    if task.name in _REGISTRY and _REGISTRY[task.name] is not task:
        raise ValueError(f"task {task.name!r} registered twice")
    _REGISTRY[task.name] = task
    return task


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for module, optional in _TASK_MODULES.items():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in optional:
                raise
            # An optional dependency of this family is absent: its tasks are not listed; the
            # reason is shown when one of them is asked for.
            _LOAD_ERRORS[module] = str(exc)
    _LOADED = True


def all_tasks() -> dict[str, Task]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_task(name: str) -> Task:
    tasks = all_tasks()
    if name not in tasks:
        hint = ""
        if _LOAD_ERRORS:
            hint = " (not loaded: " + "; ".join(f"{m}: {e}" for m, e in _LOAD_ERRORS.items()) + ")"
        raise UserError(f"unknown task {name!r}; available: {', '.join(tasks) or 'none'}{hint}")
    return tasks[name]


def check_grid_point(task: Task, config: dict[str, Any], point: str | None, keep: bool = False) -> None:
    """``--grid-point`` (one of its points) and ``--keep-grid-points`` only for a task with a grid (else a one-line
    error)."""
    if task.grid_points is None and keep:
        raise UserError(f"--keep-grid-points: task {task.name} searches no grid")
    if point is None:
        return
    if task.grid_points is None:
        raise UserError(f"--grid-point: task {task.name} searches no grid")
    points = task.grid_points(config)
    if point not in points:
        raise UserError(f"--grid-point {point!r}: not a point of {task.name}'s grid; its points: {', '.join(points)}")
