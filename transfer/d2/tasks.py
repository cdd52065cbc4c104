"""The Detectron2 tasks: detection, instance segmentation and keypoints on COCO, VOC and synthetic shapes.

Importing this module registers the tasks; it does not import Detectron2 (that happens when a task
is validated or run, through :mod:`transfer.d2.compat`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ringbench.config import add_schema_flags, settings_from_args
from ringbench.errors import UserError
from ringbench.resnets import RESNETS
from ringbench.stats import t_interval
from transfer.d2 import launch as d2launch
from transfer.d2 import train
from transfer.d2.data import check_files, resolve_data_root
from transfer.d2.synthetic_coco import DEFAULTS as SYN_DEFAULTS
from transfer.tasks import Task, TaskContext, TaskResult, register

# name -> (description, primary metric, headline metrics)
TASKS = {
    "coco_det": (
        "Faster R-CNN R50-FPN 1x, COCO 2017 train -> val (box AP)",
        "bbox/AP",
        ("bbox/AP", "bbox/AP50", "bbox/AP75"),
    ),
    "coco_instseg": ("Mask R-CNN R50-FPN 1x, COCO 2017 (box and mask AP)", "segm/AP", ("bbox/AP", "segm/AP")),
    "coco_kp": (
        "Keypoint R-CNN R50-FPN 1x, COCO 2017 person keypoints (keypoint AP)",
        "keypoints/AP",
        ("keypoints/AP", "bbox/AP"),
    ),
    "coco_instseg_c4_1x": (
        "Mask R-CNN R50-C4 1x (90k iterations), COCO 2017: MoCo's C4 protocol (box and mask AP)",
        "bbox/AP",
        ("bbox/AP", "segm/AP"),
    ),
    "coco_instseg_c4_2x": (
        "Mask R-CNN R50-C4 2x (180k iterations), COCO 2017: MoCo's coco_R_50_C4_2x_moco (box and mask AP)",
        "bbox/AP",
        ("bbox/AP", "segm/AP"),
    ),
    "voc_det": (
        "Faster R-CNN R50-C4, VOC07+12 trainval -> VOC07 test, 24k iterations (AP, AP50, AP75)",
        "bbox/AP50",
        ("bbox/AP", "bbox/AP50", "bbox/AP75"),
    ),
    "syn_det": (
        "Faster R-CNN FPN on synthetic shapes in COCO format (box AP; runs with no data)",
        "bbox/AP",
        ("bbox/AP", "bbox/AP50"),
    ),
    "syn_instseg": (
        "Mask R-CNN FPN on synthetic shapes in COCO format (box and mask AP; no data needed)",
        "segm/AP",
        ("bbox/AP", "segm/AP"),
    ),
    "syn_kp": (
        "Keypoint R-CNN FPN on synthetic shapes in COCO format (keypoint AP; no data needed)",
        "keypoints/AP",
        ("keypoints/AP", "bbox/AP"),
    ),
}
C4_ARCHS = tuple(arch for arch, spec in RESNETS.items() if spec.block == "bottleneck")


@dataclass
class Detectron2Settings:
    """The Detectron2 family's settings (its flags) with their defaults."""

    ims_per_batch: Optional[int] = field(
        default=None,
        metadata={
            "help": "total images per iteration; the learning rate, iterations, steps and warm-up follow by the "
            "linear scaling rule (default: the task config's)",
            "range": (1, None),
        },
    )
    iters: Optional[int] = field(
        default=None,
        metadata={"help": "training iterations (after scaling; steps keep their fraction)", "range": (1, None)},
    )
    lr: Optional[float] = field(
        default=None, metadata={"help": "base learning rate (replaces the scaled one)", "range": ((0,), None)}
    )
    seeds: int = field(
        default=1, metadata={"help": "train with seeds 0..N-1; metrics are mean, with std", "range": (1, None)}
    )
    freeze_at: int = field(
        default=0,
        metadata={
            "help": "backbone stages kept frozen, Detectron2's FREEZE_AT: 0 none (MoCo's fine-tuning protocol, the "
            "default), 1 the stem, 2 also res2, ... 5 the whole ResNet with frozen BN statistics (the frozen-feature "
            "detection of Goyal et al. 2019)",
            "range": (0, 5),
        },
    )
    eval_only: bool = field(
        default=False, metadata={"help": "evaluate the final weights of the same run (or --weights) without training"}
    )
    weights: Optional[str] = field(
        default=None, metadata={"help": "with --eval-only: a Detectron2 model file to evaluate"}
    )
    syn_train_images: int = field(
        default=SYN_DEFAULTS["num_train"], metadata={"help": "syn_* tasks: training images", "range": (1, None)}
    )
    syn_val_images: int = field(
        default=SYN_DEFAULTS["num_val"], metadata={"help": "syn_* tasks: validation images", "range": (1, None)}
    )
    syn_seed: int = field(
        default=SYN_DEFAULTS["seed"], metadata={"help": "syn_* tasks: dataset seed", "range": (0, None)}
    )


def add_detectron2_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the Detectron2 family (added once to the shared ``transfer/run.py`` parser)."""
    add_schema_flags(parser, Detectron2Settings, "Detectron2 tasks (coco_*, voc_det, syn_*)")
    d2launch.add_launch_arguments(parser)


def make_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    settings = settings_from_args(args, Detectron2Settings)
    config_file = f"{name}.yaml"
    reference = train.solver_reference(config_file)
    schedule = train.scale_schedule(reference, settings["ims_per_batch"], settings["iters"], settings["lr"])
    config: dict[str, Any] = {
        "config_file": config_file,
        "config_sha256": train.config_sha256(config_file),
        **schedule,
        "seeds": settings["seeds"],
        **({"freeze_at": settings["freeze_at"]} if settings["freeze_at"] else {}),  # 0: records keep their identity
        "eval_only": settings["eval_only"],
        "weights": settings["weights"],
    }
    if name.startswith("syn_"):
        config["synthetic"] = {
            **SYN_DEFAULTS,
            "num_train": settings["syn_train_images"],
            "num_val": settings["syn_val_images"],
            "seed": settings["syn_seed"],
        }
    else:
        root = resolve_data_root(getattr(args, "data_root", None))
        config["data_root"] = str(root) if root else None
    return config


def validate(name: str, backbone: Any, config: dict[str, Any]) -> None:
    """Everything that would fail later, checked before any training starts."""
    if backbone.streams:
        raise UserError(
            f"{backbone.path}: a two-stream card ({'+'.join(backbone.streams)}) cannot be a Detectron2 backbone; "
            f"{name} takes one-stream torchvision ResNets: {', '.join(RESNETS)}"
        )
    if backbone.arch not in RESNETS:
        raise UserError(
            f"{backbone.path}: architecture {backbone.arch!r} has no Detectron2 backbone here; {name} supports "
            f"torchvision ResNets: {', '.join(RESNETS)}"
        )
    if is_c4(name) and backbone.arch not in C4_ARCHS:
        raise UserError(
            f"{name} uses the C4 layout, whose res5 box head needs bottleneck blocks: "
            f"{', '.join(C4_ARCHS)} (got {backbone.arch})"
        )
    if config["seeds"] < 1:
        raise UserError(f"--seeds must be at least 1, got {config['seeds']}")
    if not 0 <= config.get("freeze_at", 0) <= 5:
        raise UserError(f"--freeze-at must be 0-5 (the stem and res2..res5), got {config['freeze_at']}")
    if config["ims_per_batch"] < 1 or config["max_iter"] < 1 or not config["base_lr"] > 0:
        raise UserError("--ims-per-batch and --iters must be positive and --lr must be > 0")
    if config.get("weights"):
        if not config["eval_only"]:
            raise UserError("--weights is for --eval-only runs (training starts from the backbone card)")
        if not Path(config["weights"]).is_file():
            raise UserError(f"--weights {config['weights']}: no such file")
        from transfer.d2.weights import read_model_file

        read_model_file(config["weights"])  # refused now (bad or unsafe), not after the datasets are built
    synthetic = config.get("synthetic")
    if synthetic and (synthetic["num_train"] < 1 or synthetic["num_val"] < 1):
        raise UserError("--syn-train-images and --syn-val-images must be at least 1")
    if not synthetic:
        check_files(name, Path(config["data_root"]) if config.get("data_root") else None)
    from transfer.d2.modeling import check_conversion  # imports Detectron2 (clear error if absent)

    check_conversion(backbone.arch, backbone.stem, backbone.state_dict, source=str(backbone.path))


def is_c4(name: str) -> bool:
    """Whether the task's config is an R-CNN C4 (res5 box head) one."""
    heads = train.read_config(f"{name}.yaml").get("MODEL", {}).get("ROI_HEADS", {})
    return str(heads.get("NAME", "")).startswith("Res5")


def eval_weights(config: dict[str, Any], ctx: TaskContext, seed: int) -> str | None:
    """The model file an ``--eval-only`` run evaluates: ``--weights``, or the training run's final weights."""
    if not config["eval_only"]:
        return None
    if config.get("weights"):
        return config["weights"]
    trained = {**config, "eval_only": False, "weights": None}
    path = ctx.output_dir_for(trained) / f"seed{seed}" / "model_final.pth"
    if not path.is_file():
        raise UserError(
            f"--eval-only: no trained weights at {path}; train first (same flags without --eval-only) or pass --weights"
        )
    return str(path)


def run(name: str, backbone: Any, config: dict[str, Any], ctx: TaskContext) -> TaskResult:
    spec = ctx.launch or d2launch.Launch()
    if config["ims_per_batch"] % spec.world_size:
        raise UserError(
            f"--ims-per-batch {config['ims_per_batch']} does not split over {spec.world_size} processes; "
            f"give a multiple of {spec.world_size}"
        )
    seeds = list(range(config["seeds"]))
    per_seed = []
    for seed in seeds:
        seed_dir = Path(ctx.output_dir) / f"seed{seed}"
        if ctx.force and spec.machine_rank == 0:
            forget_seed(seed_dir)
        payload = {
            "task": name,
            "backbone": backbone,
            "config": config,
            "seed": seed,
            "device": ctx.device,
            "output_dir": str(seed_dir),
            "cache_dir": str(ctx.cache_dir) if ctx.cache_dir else None,
            "eval_only_weights": eval_weights(config, ctx, seed),
            "tensorboard": ctx.tensorboard,
        }
        per_seed.append(train.launch_seed(payload, spec))
    if spec.machine_rank != 0:
        return TaskResult(metrics={}, seeds=seeds, extra={"machine_rank": spec.machine_rank}, write_record=False)
    result = aggregate([r for r in per_seed if r is not None], seeds, engine_versions())
    result.extra.update(launch_extra(per_seed, spec))
    return result


def forget_seed(seed_dir: Path) -> None:
    """``--force``: the seed's result and checkpoints go, so that it trains again from the card."""
    for path in [seed_dir / "results.json", seed_dir / "last_checkpoint", *seed_dir.glob("model_*.pth")]:
        path.unlink(missing_ok=True)


def launch_extra(per_seed: list[dict[str, Any] | None], spec: Any) -> dict[str, Any]:
    """What the record says of how the run was spread: processes, total batch, norm (of the seeds' runs)."""
    launches = [r.get("launch", {}) for r in per_seed if r]
    first = launches[0] if launches else {}
    return {
        "world_size": first.get("world_size", spec.world_size),
        "ims_per_batch": first.get("ims_per_batch"),
        "norm": first.get("norm"),
        "launch": {**spec.as_dict(), "per_seed": launches},
    }


def describe_config(name: str, backbone: Any, config: dict[str, Any], ctx: TaskContext) -> str:
    """``--print-config``: the resolved Detectron2 config of seed 0, built without the data."""
    cfg = resolved_cfg(name, backbone, config, ctx.device, Path(ctx.output_dir) / "seed0")
    spec = ctx.launch or d2launch.Launch()
    header = (
        f"# {name}: resolved Detectron2 config (seed 0); {spec.world_size} process(es), "
        f"{config['ims_per_batch'] // spec.world_size} images per process, {spec.backend}\n"
    )
    return header + cfg.dump()


def resolved_cfg(name: str, backbone: Any, config: dict[str, Any], device: str = "cpu", output_dir: Path = Path(".")):
    """The Detectron2 config a run of ``name`` trains with (dataset names unregistered: no data read)."""
    from transfer.d2.data import splits_without_data

    return train.build_cfg(config, backbone, splits_without_data(name), output_dir, device, seed=0)


def aggregate(per_seed: list[dict[str, Any]], seeds: list[int], versions: dict[str, str]) -> TaskResult:
    """Mean over seeds; sample std and a t-based 95% interval of the mean when there are several."""
    keys = [k for k in per_seed[0]["metrics"] if all(k in r["metrics"] for r in per_seed)]
    metrics, std, ci95 = {}, {}, {}
    for key in keys:
        values = [r["metrics"][key] for r in per_seed]
        metrics[key] = sum(values) / len(values)
        interval = t_interval(values)  # the leaderboard's small-n interval (ringbench/stats.py)
        if interval is not None:
            std[key] = math.sqrt(sum((v - metrics[key]) ** 2 for v in values) / (len(values) - 1))
            ci95[key] = (interval[1] - interval[0]) / 2
    extra: dict[str, Any] = {
        "per_seed": [r["metrics"] for r in per_seed],
        "timings": [r.get("timings", {}) for r in per_seed],
    }
    if std:
        extra["std"] = std
    for key in ("undefined", "no_predictions"):
        found = sorted({k for r in per_seed for k in r.get("extra", {}).get(key, [])})
        if found:
            extra[key] = found
    return TaskResult(metrics=metrics, ci95=ci95, seeds=seeds, extra=extra, engine_versions=versions)


def engine_versions() -> dict[str, str]:
    from transfer.d2.compat import engine_versions as versions

    return versions()


def _register(name: str) -> None:
    description, primary, headline = TASKS[name]
    register(
        Task(
            name=name,
            family="detectron2",
            description=description,
            make_config=lambda args: make_config(name, args),
            run=lambda backbone, config, ctx: run(name, backbone, config, ctx),
            validate=lambda backbone, config: validate(name, backbone, config),
            add_arguments=add_detectron2_arguments,
            primary_metric=primary,
            headline=headline,
            needs_data=not name.startswith("syn_"),
            unused_flags=() if name.startswith("syn_") else ("syn_train_images", "syn_val_images", "syn_seed"),
            describe_config=lambda backbone, config, ctx: describe_config(name, backbone, config, ctx),
            make_launch=d2launch.launch_from_args,
        )
    )


for _name in TASKS:
    _register(_name)
