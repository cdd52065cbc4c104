"""Cross-domain few-shot (BSCD-FSL) and few-shot on the many-shot battery's data sets, on frozen features.

* ``cdfsl_cropdiseases``, ``cdfsl_eurosat``, ``cdfsl_isic``, ``cdfsl_chestx``, ``cdfsl_all`` and the embedded twin
  ``cdfsl_synthetic``: Guo et al., "A Broader Study of Cross-Domain Few-Shot Learning" (ECCV 2020),
  ``IBM/cdfsl-benchmark``. 5-way episodes at 5, 20 and 50 shots (``--cdfsl-shots``), 15 queries per class,
  600 episodes per shot count, drawn from the whole data set (``transfer.cdfsl_data``); images scaled to the
  square ``int(1.15 x 224)`` and centre-cropped to 224 (the benchmark's test transform, ``Scale`` +
  ``CenterCrop``: ``resize="scale-1.15-crop"``). One record holds every shot count: ``acc_<k>shot`` (and, for
  ``cdfsl_all``, ``<set>/acc_<k>shot`` and ``acc_<k>shot`` the mean over the four sets), each with its 95%
  interval ``1.96 std / sqrt(n)`` and its per-episode accuracies (``extra.per_episode``, percent).
* ``fewshot_<set>`` for each single-label data set of ``transfer.battery_data.BATTERY`` (VOC2007 is multi-label):
  ``linusericsson/ssl-transfer`` ``few_shot.py`` (Ericsson et al., CVPR 2021): 5-way 5-shot 15-query episodes
  (``--ways/--shots/--queries``), 600 of them, over every split of the data set pooled (its ``SetDataset``
  concatenates train, val and test), the same test transform at 224; metric ``acc``.

Episodes come from ``metadataset.sampling`` (classes uniformly among those with enough images, images
uniformly without replacement) with the generator seeded by ``(--episode-seed, "<set>/<k>shot")`` (``<set>``
for ``fewshot_<set>``): the same episodes for every card, so that two cards' accuracies pair episode by
episode. Probes (``--probe``): ``metadataset.probes``, ``sgd_linear`` being the benchmark's own baseline.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from metadataset.evaluate import SourceResult, evaluate_source
from metadataset.features import POOLINGS
from metadataset.probes import make_probe, probe_from_config
from metadataset.sampling import FixedEpisodes, validate_episodes
from metadataset.sources import ImageSet, data_digest, limit_per_class, synthetic_source
from ringbench.errors import UserError
from transfer.battery_data import BATTERY, Listing
from transfer.cdfsl_data import CDFSL_SETS
from transfer.fewshot import add_fewshot_arguments, resolve_settings
from transfer.linear import DATA_ROOT_ENV, data_root_setting
from transfer.tasks import Task, TaskContext, TaskResult, register

IMAGE_SIZE = 224  # BSCD-FSL's and ssl-transfer's image_size
RESIZE = "scale-1.15-crop"  # their test transform: Scale([int(1.15 * 224)] * 2), CenterCrop(224)
FAMILY_ONLY = ("md_root", "md_split", "episode_mode")  # few-shot flags of the Meta-Dataset tasks


def parse_shots(text: Any) -> list[int]:
    """``"5,20,50"`` (or a YAML list) -> ``[5, 20, 50]``: distinct positive integers, ascending."""
    parts = text if isinstance(text, list) else str(text).replace(",", " ").split()
    try:
        shots = sorted({int(p) for p in parts})
    except (TypeError, ValueError):
        raise UserError(f"--cdfsl-shots must be comma-separated positive integers, got {text!r}") from None
    if not shots or shots[0] < 1:
        raise UserError(f"--cdfsl-shots must be comma-separated positive integers, got {text!r}")
    return shots


def pooled_image_set(task: str, listing: Listing) -> ImageSet:
    """Every split of a listing as one image set (the pool the episodes are drawn from); classes with no image
    are left out, as ssl-transfer's ``SetDataset`` deletes them (Birdsnap's species the download did not get)."""
    parts = [(name, split) for name, split in sorted(listing.splits.items())]
    labels = np.concatenate([np.asarray(s.labels, dtype=np.int64) for _, s in parts])
    counts = np.bincount(labels, minlength=len(listing.classes))
    kept = np.flatnonzero(counts)
    new_label = np.cumsum(counts > 0) - 1

    def items() -> Iterator[tuple[int, str, Any]]:
        for name, split in parts:
            for i, ref in enumerate(split.refs):
                yield int(new_label[split.labels[i]]), f"{name}/{ref}", (lambda i=i, split=split: split.load(i))

    return ImageSet(
        name=task,
        split="all",
        class_names=[listing.classes[c] for c in kept],
        counts=counts[kept].astype(np.int64),
        items=items,
        fingerprint=data_digest(task, [(name, s.fingerprint) for name, s in parts]),
        info={**listing.info, "classes_without_images": [listing.classes[c] for c in np.flatnonzero(counts == 0)]},
    )


def _listing(kind: str, name: str, config: dict[str, Any], task: str) -> Listing:
    layout = CDFSL_SETS[name][2] if kind == "cdfsl" else BATTERY[name].layout
    if config["data_root"] is None:
        raise UserError(
            f"{task} needs its data: pass --data-root (the folder holding {layout}) or set ${DATA_ROOT_ENV}; "
            "nothing is downloaded"
        )
    root = Path(config["data_root"])
    return CDFSL_SETS[name][1](root) if kind == "cdfsl" else BATTERY[name].read(root, 0)


def open_set(kind: str, name: str, config: dict[str, Any], render_size: int, task: str) -> ImageSet:
    """The image pool of one data set (``kind``: ``cdfsl``, ``battery`` or ``synthetic``), named ``cdfsl_<set>`` or
    ``fewshot_<set>`` whichever task reads it, so that ``cdfsl_all`` and ``cdfsl_<set>`` share cached features."""
    if kind == "synthetic":
        image_set = synthetic_source(config["synthetic"]["classes"], config["synthetic"]["images"], render_size)
    else:
        image_set = pooled_image_set(
            f"{kind if kind == 'cdfsl' else 'fewshot'}_{name}", _listing(kind, name, config, task)
        )
    return limit_per_class(image_set, config["max_images_per_class"])


def metric_names(config: dict[str, Any]) -> dict[int, str]:
    """shots -> metric of one set: ``acc_<k>shot`` (BSCD-FSL), ``acc`` (``fewshot_<set>``: one shot count)."""
    return {k: ("acc" if config["protocol"] != "bscd-fsl" else f"acc_{k}shot") for k in config["shots"]}


def _config(kind: str, sets: list[str], args: argparse.Namespace) -> dict[str, Any]:
    settings = resolve_settings(args, ["synthetic"] if kind == "synthetic" else sets)
    cdfsl = kind != "battery"
    config: dict[str, Any] = {
        "protocol": "bscd-fsl" if cdfsl else "ssl-transfer-few-shot",
        "sets": sets,
        "ways": settings["ways"],
        "shots": parse_shots(settings["cdfsl_shots"]) if cdfsl else [settings["shots"]],
        "queries": settings["queries"],
        "episodes": settings["episodes"],
        "episode_seed": settings["episode_seed"],
        "probe": make_probe(settings["probe"], weight_decay=settings["weight_decay"], knn_k=settings["knn_k"]).config(),
        "image_size": settings["image_size"] or (None if kind == "synthetic" else IMAGE_SIZE),
        "resize": RESIZE,
        "pooling": settings["pooling"],
        "max_images_per_class": settings["max_images_per_class"],
    }
    if kind == "synthetic":
        config["synthetic"] = {"classes": settings["synthetic_classes"], "images": settings["cdfsl_synthetic_images"]}
    else:
        config["data_root"] = data_root_setting(args)
    return config


def run_sets(kind: str, backbone: Any, config: dict[str, Any], ctx: TaskContext, task: str) -> TaskResult:
    """Features of each set (cached), then each shot count's episodes; metrics, intervals, per-episode values."""
    probe = probe_from_config(config["probe"], device=ctx.device)
    image_size = config["image_size"] or backbone.default_image_size
    names = metric_names(config)
    several = len(config["sets"]) > 1
    metrics: dict[str, float] = {}
    ci: dict[str, float] = {}
    extra: dict[str, Any] = {key: {} for key in ("per_episode", "images", "classes", "skipped_images")}
    extra.update(feature_cache={}, probe_seconds={})
    results: dict[int, list[SourceResult]] = {k: [] for k in config["shots"]}
    build = functools.cache(backbone.build_model)  # one model for every set whose features are not cached
    for name in config["sets"]:
        image_set = open_set(kind, name, config, image_size, task)
        feats = ctx.features(
            backbone, image_set, image_size, config["pooling"], resize=config["resize"], build_model=build
        )
        for k in config["shots"]:
            tag = f"{name}/{k}shot" if config["protocol"] == "bscd-fsl" else name
            rules = FixedEpisodes(config["ways"], k, config["queries"])
            result = evaluate_source(
                tag,
                feats.features,
                feats.labels,
                feats.class_names,
                probe,
                rules,
                episodes=config["episodes"],
                seed=config["episode_seed"],
                progress=not ctx.debug,
            )
            results[k].append(result)
            metric = f"{name}/{names[k]}" if several else names[k]
            metrics[metric], ci[metric] = 100 * result.mean, 100 * result.ci95
            extra["per_episode"][metric] = [round(100 * float(a), 4) for a in result.accuracies]
            extra["probe_seconds"][tag] = round(result.seconds, 3)
            print(f"{task}: {metric} {metrics[metric]:.2f} ± {ci[metric]:.2f}", file=sys.stderr)
        extra["images"][name], extra["classes"][name] = len(feats.labels), feats.num_classes
        extra["skipped_images"][name] = len(feats.skipped)
        extra["feature_cache"][name] = {"hit": feats.from_cache, "path": str(feats.path)}
    if several:  # the mean over sets, paired episode by episode (every set has the same number of episodes)
        for k, found in results.items():
            means = [100 * r.mean for r in found]
            metrics[names[k]] = float(np.mean(means))
            ci[names[k]] = float(np.sqrt(np.sum([(100 * r.ci95) ** 2 for r in found])) / len(found))
            per_episode = np.mean([100 * r.accuracies for r in found], axis=0)
            extra["per_episode"][names[k]] = [round(float(a), 4) for a in per_episode]
            # the leaderboard's average rank leaves a mean out beside its parts
            extra.setdefault("aggregates", {})[names[k]] = [f"{s}/{names[k]}" for s in config["sets"]]
            print(f"{task}: {names[k]} (mean over sets) {metrics[names[k]]:.2f} ± {ci[names[k]]:.2f}", file=sys.stderr)
    return TaskResult(metrics=metrics, ci95=ci, seeds=[config["episode_seed"]], extra=extra)


def make_task(kind: str, name: str, sets: list[str], description: str) -> Task:
    """``kind``: ``cdfsl`` (BSCD-FSL data on disk), ``synthetic`` (its embedded twin) or ``battery``."""

    def make_config(args: argparse.Namespace) -> dict[str, Any]:
        return _config(kind, sets, args)

    def validate(backbone: Any, config: dict[str, Any]) -> None:
        if config["pooling"] not in POOLINGS:
            raise UserError(f"--pooling must be one of {list(POOLINGS)}, got {config['pooling']!r}")
        rules = FixedEpisodes(config["ways"], max(config["shots"]), config["queries"])
        for s in sets:  # listed counts, before any feature is extracted
            try:
                image_set = open_set(kind, s, config, backbone.default_image_size, name)
            except UserError as exc:
                if len(sets) == 1:
                    raise
                raise UserError(f"{name} runs all {len(sets)} data sets; the first missing is {s}: {exc}") from None
            validate_episodes(image_set.class_names, image_set.counts, rules, where=f"{name} ({s})")

    def run(backbone: Any, config: dict[str, Any], ctx: TaskContext) -> TaskResult:
        return run_sets(kind, backbone, config, ctx, name)

    # the protocol's metrics (another --cdfsl-shots names others: a record's headline keeps those it has)
    headline = ("acc_5shot", "acc_20shot", "acc_50shot") if kind != "battery" else ("acc",)
    unused: list[str] = [*FAMILY_ONLY, "synthetic_images"]
    unused += ["shots"] if kind == "synthetic" else ["synthetic_classes", "cdfsl_synthetic_images"]
    unused += ["cdfsl_shots"] if kind == "battery" else ["shots"] if kind == "cdfsl" else []
    return Task(
        name=name,
        family="fewshot",
        description=description,
        make_config=make_config,
        run=run,
        validate=validate,
        add_arguments=add_fewshot_arguments,
        primary_metric=headline[0],
        headline=headline,
        needs_data=kind != "synthetic",
        unused_flags=tuple(dict.fromkeys(unused)),
    )


for _set, _about in CDFSL_SETS.items():
    register(
        make_task(
            "cdfsl",
            f"cdfsl_{_set}",
            [_set],
            f"BSCD-FSL cross-domain few-shot, {_about[0]}: 5-way 5/20/50-shot (--data-root)",
        )
    )
register(
    make_task(
        "cdfsl",
        "cdfsl_all",
        list(CDFSL_SETS),
        "BSCD-FSL, all four data sets: 5/20/50-shot accuracy of each and their mean (--data-root)",
    )
)
register(
    make_task(
        "synthetic", "cdfsl_synthetic", ["synthetic"], "BSCD-FSL's 5/20/50-shot protocol on synthetic shapes (embedded)"
    )
)
for _set, _spec in BATTERY.items():
    if _spec.problem == "multiclass":
        register(
            make_task(
                "battery",
                f"fewshot_{_set}",
                [_set],
                f"ssl-transfer 5-way 5-shot episodes on {_spec.title}, all splits (--data-root)",
            )
        )
