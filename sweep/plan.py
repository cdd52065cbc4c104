"""A sweep's plan: the YAML schema (backbones, tasks with their flags and resources, cluster settings), loaded
and checked, and the layout of the files a sweep writes. Unknown keys and wrong types are one-line errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ringbench.config import compose, read_yaml_mapping
from ringbench.errors import UserError


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
    """A plan's Slurm settings (``cluster:``), given to every job array."""

    partition: Optional[str] = None
    array_parallelism: int = 64
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None


@dataclass
class PlanSchema:
    """The keys of a plan file (:func:`load_plan` merges the file over these defaults)."""

    backbones: list[BackboneEntry] = field(default_factory=list)
    tasks: dict[str, Any] = field(default_factory=dict)  # task -> {flag: value, ..., resources: {...}}
    pretrain_args: list[str] = field(default_factory=list)  # for every recipe
    cluster: ClusterSettings = field(default_factory=ClusterSettings)


def load_plan(path: Path) -> dict[str, Any]:
    """The plan file merged over :class:`PlanSchema`: unknown keys and wrong types are one-line errors."""
    data = read_yaml_mapping(path, "sweep plan")
    plan = compose(PlanSchema, [(str(path), data)])
    if not plan["backbones"]:
        raise UserError(f"{path}: the plan needs a non-empty 'backbones' list")
    if not plan["tasks"]:
        raise UserError(f"{path}: the plan needs a non-empty 'tasks' mapping")
    if plan["cluster"]["array_parallelism"] < 1:
        raise UserError(f"{path}: cluster.array_parallelism must be at least 1")
    return plan


def parse_resources(data: Any, where: str) -> Resources:
    """A ``resources:`` mapping over the defaults, checked (counts at least 1, no negative GPUs)."""
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping (gpus, cpus, mem_gb, time_min, nodes), got {data!r}")
    values = compose(Resources, [(where, data or {})])
    res = Resources(**values)
    if res.gpus < 0 or res.cpus < 1 or res.mem_gb <= 0 or res.time_min < 1 or res.nodes < 1:
        raise UserError(f"{where}: resources need gpus >= 0, cpus >= 1, mem_gb > 0, time_min >= 1, nodes >= 1")
    return res


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
