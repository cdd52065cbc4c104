"""Few-shot transfer tasks: ``md_<source>`` (ten Meta-Dataset sources), ``md_all``,
``fewshot_synthetic`` and ``fewshot_digits`` (embedded data, nothing on disk).

    python transfer/run.py --backbone X.pth --task md_all --md-root /data/records --probe logreg
    python transfer/run.py --backbone X.pth --task fewshot_digits --episodes 200 --probe centroid

Settings come from the command line, else from ``--fewshot-config`` (a YAML file such as
``configs/metadataset/meta_dataset.yaml``), else from the defaults below. Meta-Dataset tasks use
variable-way variable-shot episodes; the embedded tasks use fixed 5-way 5-shot 15-query episodes;
``--ways/--shots/--queries`` (or ``--episode-mode fixed``) select fixed episodes anywhere.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from metadataset.evaluate import SourceResult, evaluate_source, summarise, table_rows
from metadataset.features import POOLINGS
from metadataset.probes import PROBES, make_probe, probe_from_config
from metadataset.sampling import FixedEpisodes, VariableEpisodes, validate_episodes
from metadataset.sources import MD_SOURCES, limit_per_class, open_source
from ringbench.config import add_schema_flags, given_flags, settings_from_args
from ringbench.errors import UserError
from ringbench.fileio import resolved_path
from transfer.tasks import Task, TaskContext, TaskResult, register

MD_ROOT_ENV = "RINGBENCH_MD_ROOT"


MAX_EPISODES = 100_000  # Meta-Dataset uses 600; more is a typo, not a protocol
CDFSL_ONLY_FLAGS = ("cdfsl_shots", "cdfsl_synthetic_images")  # the settings only transfer.cdfsl's tasks read


def _help(text: str, low: int | None = None) -> Any:
    """An optional setting (default None) with its help, and its lower bound when it is a count."""
    return field(default=None, metadata={"help": text, **({"range": (low, None)} if low is not None else {})})


@dataclass
class FewShotSettings:
    """The few-shot family's settings: flags, ``--fewshot-config`` YAML keys and defaults in one place."""

    probe: str = field(default="logreg", metadata={"help": f"few-shot probe: {' | '.join(PROBES)}"})
    weight_decay: str = field(
        default="cv",
        metadata={
            "help": "logreg L2 weight: a number, or 'cv' (chosen per episode by cross-validation on the support set)"
        },
    )
    knn_k: int = field(default=1, metadata={"help": "neighbours of the k-NN probe", "range": (1, None)})
    episodes: int = field(
        default=600, metadata={"help": "episodes per source (Meta-Dataset: 600)", "range": (1, MAX_EPISODES)}
    )
    episode_mode: Optional[str] = _help(
        "'variable' (Meta-Dataset's variable-way variable-shot) or 'fixed' (N-way "
        "K-shot Q-query); default: variable for md_* tasks, fixed for fewshot_*"
    )
    ways: int = field(
        default=5,
        metadata={"help": "fixed episodes: classes per episode (implies --episode-mode fixed)", "range": (2, None)},
    )
    shots: int = field(
        default=5, metadata={"help": "fixed episodes: support images per class (implies fixed)", "range": (1, None)}
    )
    queries: int = field(
        default=15, metadata={"help": "fixed episodes: query images per class (implies fixed)", "range": (1, None)}
    )
    episode_seed: int = field(
        default=0,
        metadata={"help": "seed of the episodes (same seed: same episodes for every backbone)", "range": (0, None)},
    )
    md_split: str = field(default="test", metadata={"help": "class split of the sources: train | valid | test"})
    image_size: Optional[int] = _help("resize images to this square size (default: the backbone card's)", low=1)
    pooling: str = field(default="avg", metadata={"help": f"feature pooling: {' | '.join(POOLINGS)}"})
    max_images_per_class: Optional[int] = _help(
        "use at most this many images per class (the first ones in the source's order); default all", low=2
    )
    synthetic_classes: int = field(
        default=32, metadata={"help": "fewshot_synthetic: number of shape classes", "range": (1, None)}
    )
    synthetic_images: int = field(
        default=40, metadata={"help": "fewshot_synthetic: images per class", "range": (2, None)}
    )
    cdfsl_shots: str = field(
        default="5,20,50",
        metadata={"help": "cdfsl_* tasks: comma-separated shots, one metric each (BSCD-FSL: 5,20,50)"},
    )
    cdfsl_synthetic_images: int = field(
        default=65,
        metadata={"help": "cdfsl_synthetic: images per class (50 shots + 15 queries)", "range": (2, None)},
    )


def add_fewshot_arguments(parser: argparse.ArgumentParser) -> None:
    """The few-shot family's flags (added once to the shared ``transfer/run.py`` parser)."""
    group = add_schema_flags(parser, FewShotSettings, "few-shot tasks (md_*, fewshot_*, cdfsl_*)")
    if group is None:
        return
    group.add_argument(
        "--md-root",
        type=Path,
        default=None,
        help=f"folder holding the converted Meta-Dataset sources (e.g. <root>/omniglot/"
        f"dataset_spec.json); default --data-root, else ${MD_ROOT_ENV}",
    )
    group.add_argument(
        "--fewshot-config",
        default=None,
        help="YAML file of few-shot settings, or a shipped one's name (configs/metadataset/: "
        "meta_dataset, fixed_5way_5shot, demo); flags override it",
    )


def resolve_settings(args: argparse.Namespace, sources: list[str]) -> dict[str, Any]:
    """Command line over YAML over defaults, checked and resolved to plain values."""
    settings = settings_from_args(
        args, FewShotSettings, getattr(args, "fewshot_config", None), "--fewshot-config", kind="metadataset"
    )
    given = given_flags(args, FewShotSettings)
    embedded = all(s in ("synthetic", "digits") for s in sources)
    if settings["episode_mode"] is None:
        fixed_flags = any(k in given for k in ("ways", "shots", "queries"))
        settings["episode_mode"] = "fixed" if embedded or fixed_flags else "variable"
    if settings["episode_mode"] not in ("variable", "fixed"):
        raise UserError(f"--episode-mode must be 'variable' or 'fixed', got {settings['episode_mode']!r}")
    if settings["probe"] not in PROBES:
        raise UserError(f"--probe must be one of {list(PROBES)}, got {settings['probe']!r}")
    if settings["weight_decay"] != "cv":
        try:
            settings["weight_decay"] = float(settings["weight_decay"])
        except ValueError:
            raise UserError(f"--weight-decay must be a number or 'cv', got {settings['weight_decay']!r}") from None
        if not math.isfinite(settings["weight_decay"]) or settings["weight_decay"] <= 0:
            raise UserError(f"--weight-decay must be a positive number or 'cv', got {settings['weight_decay']}")
    return settings


def _md_root(args: argparse.Namespace) -> str | None:
    root = getattr(args, "md_root", None) or getattr(args, "data_root", None) or os.environ.get(MD_ROOT_ENV)
    return str(resolved_path(root, "--md-root")) if root else None


def _probe(settings: dict[str, Any], device: str = "cpu"):
    return make_probe(settings["probe"], weight_decay=settings["weight_decay"], knn_k=settings["knn_k"], device=device)


def _rules(settings: dict[str, Any]) -> VariableEpisodes | FixedEpisodes:
    if settings["episode_mode"] == "fixed":
        return FixedEpisodes(settings["ways"], settings["shots"], settings["queries"])
    return VariableEpisodes()


def make_fewshot_task(name: str, sources: list[str], description: str, needs_data: bool) -> Task:
    def make_config(args: argparse.Namespace) -> dict[str, Any]:
        settings = resolve_settings(args, sources)
        rules = _rules(settings)
        config = {
            "sources": sources,
            "split": settings["md_split"] if needs_data else "test",
            "episodes": settings["episodes"],
            "episode_mode": settings["episode_mode"],
            "episode_rules": dict(vars(rules)),
            "episode_seed": settings["episode_seed"],
            "probe": _probe(settings).config(),
            "image_size": settings["image_size"],
            "pooling": settings["pooling"],
            "max_images_per_class": settings["max_images_per_class"],
        }
        if needs_data:
            config["md_root"] = _md_root(args)
        if "synthetic" in sources:
            config["synthetic"] = {"classes": settings["synthetic_classes"], "images": settings["synthetic_images"]}
        return config

    def validate(backbone: Any, config: dict[str, Any]) -> None:
        if config["pooling"] not in POOLINGS:
            raise UserError(f"--pooling must be one of {list(POOLINGS)}, got {config['pooling']!r}")
        rules = _rules_from_config(config)
        for source in sources:  # listed counts: caught here, before any feature is extracted
            image_set = _open(source, config, backbone)
            validate_episodes(image_set.class_names, image_set.counts, rules, where=source)

    def run(backbone: Any, config: dict[str, Any], ctx: TaskContext) -> TaskResult:
        return run_fewshot(backbone, config, ctx)

    return Task(
        name=name,
        family="fewshot",
        description=description,
        make_config=make_config,
        run=run,
        validate=validate,
        add_arguments=add_fewshot_arguments,
        primary_metric="acc_avg" if len(sources) > 1 else "acc",
        needs_data=needs_data,
        unused_flags=(() if "synthetic" in sources else ("synthetic_classes", "synthetic_images"))
        + (() if needs_data else ("md_root", "md_split"))
        + CDFSL_ONLY_FLAGS,
    )


def _rules_from_config(config: dict[str, Any]) -> VariableEpisodes | FixedEpisodes:
    kind = FixedEpisodes if config["episode_mode"] == "fixed" else VariableEpisodes
    return kind(**config["episode_rules"])


def _open(source: str, config: dict[str, Any], backbone: Any):
    image_size = config["image_size"] or backbone.default_image_size
    extra = {}
    if source == "synthetic":
        extra = {"num_classes": config["synthetic"]["classes"], "images_per_class": config["synthetic"]["images"]}
    image_set = open_source(source, root=config.get("md_root"), split=config["split"], image_size=image_size, **extra)
    return limit_per_class(image_set, config["max_images_per_class"])


def run_fewshot(backbone: Any, config: dict[str, Any], ctx: TaskContext) -> TaskResult:
    """Extract (or re-read) each source's features, run the episodes, summarise."""
    from tabulate import tabulate

    rules = _rules_from_config(config)
    probe = probe_from_config(config["probe"], device=ctx.device)
    results: list[SourceResult] = []
    extra: dict[str, Any] = {
        "episode_accuracies": {},
        "skipped_images": {},
        "skipped_refs": {},
        "feature_cache": {},
        "images": {},
        "classes": {},
        "mean_ways": {},
        "mean_support": {},
        "probe_seconds": {},
    }
    for source in config["sources"]:
        image_set = _open(source, config, backbone)
        feats = ctx.features(backbone, image_set, config["image_size"], config["pooling"])
        result = evaluate_source(
            source,
            feats.features,
            feats.labels,
            feats.class_names,
            probe,
            rules,
            episodes=config["episodes"],
            seed=config["episode_seed"],
            structure=image_set.structure,
            progress=not ctx.debug,
        )
        results.append(result)
        extra["episode_accuracies"][source] = [round(float(a), 5) for a in result.accuracies]
        extra["skipped_images"][source] = len(feats.skipped)
        extra["skipped_refs"][source] = feats.skipped[:20]
        extra["feature_cache"][source] = {
            "hit": feats.from_cache,
            "path": str(feats.path),
            "extract_seconds": round(feats.seconds, 2),
        }
        extra["images"][source] = len(feats.labels)
        extra["classes"][source] = feats.num_classes
        extra["mean_ways"][source] = float(result.ways.mean())
        extra["mean_support"][source] = float(result.support_sizes.mean())
        extra["probe_seconds"][source] = round(result.seconds, 3)
    metrics, ci = summarise(results)
    if len(results) > 1:  # acc_avg sums up the sources: the leaderboard's average rank leaves it out
        extra["aggregates"] = {"acc_avg": [f"acc_{r.source}" for r in results]}
    print(tabulate(table_rows(results), headers=["source", "accuracy (%)", "episodes"]), file=sys.stderr)
    return TaskResult(metrics=metrics, ci95=ci, seeds=[config["episode_seed"]], extra=extra)


for _short in MD_SOURCES:
    register(
        make_fewshot_task(
            f"md_{_short}",
            [_short],
            f"Meta-Dataset {MD_SOURCES[_short]}: few-shot episodes "
            "on frozen features (official records or image folder)",
            needs_data=True,
        )
    )
register(
    make_fewshot_task(
        "md_all",
        list(MD_SOURCES),
        "Meta-Dataset, all ten sources: per-source accuracy and their average",
        needs_data=True,
    )
)
register(
    make_fewshot_task(
        "fewshot_synthetic",
        ["synthetic"],
        "few-shot episodes on held-out synthetic shape classes (embedded)",
        needs_data=False,
    )
)
register(
    make_fewshot_task(
        "fewshot_digits",
        ["digits"],
        "few-shot episodes on scikit-learn's handwritten digits (embedded, 10 classes)",
        needs_data=False,
    )
)
