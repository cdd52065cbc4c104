"""Pretraining configuration: the schema :data:`PretrainConfig` (the keys of every run,
:class:`CommonConfig`, plus one section per registered method that has one, e.g. ``moco``), a YAML
file merged over its defaults, a profile, then ``key=value`` overrides
(:func:`ringbench.config.compose`), then the cross-field checks of :func:`validate_config`.

A key that is not in the schema, or a value of the wrong type, is an error naming the key and the
file or override it came from (a typo never silently falls back to a default). The resolved config
is a plain nested dict. The methods, the losses each accepts and their sections come from the
method registry (:mod:`pretrain.methods.registry`), read on first use so that importing this module
stays free of torch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from ringbench.config import Layer, check_range, compose, find_config, read_yaml_mapping
from ringbench.errors import UserError
from ringbench.resnets import TORCHVISION_RESNETS

DATASETS = ("synthetic", "cifar10", "cifar100", "stl10", "imagefolder")
AUGMENTATIONS = ("mocov2", "ring_official")
STL10_SPLITS = ("train+unlabeled", "train")
MILESTONE_ROUNDINGS = ("exact", "int")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("step", "cosine", "constant")


@dataclass
class DataConfig:
    name: str = "synthetic"
    root: Optional[str] = None
    image_size: Optional[int] = None  # null: the dataset's native size (32 CIFAR, 96 STL-10, 224 ImageNet)
    workers: int = 2
    synthetic_classes: int = 64
    synthetic_images_per_class: int = 100
    synthetic_image_size: int = 32
    synthetic_seed: int = 0
    blur: Optional[bool] = None  # null: Gaussian blur for images of 96 px and above (MoCo v2)
    color_jitter: float = 0.8  # probability of the MoCo v2 colour jitter (CMC: 0, its ab view needs colour)
    jitter_hue: float = 0.1  # MoCo v2 colour jitter hue; 0 keeps colour a usable cue
    grayscale: float = 0.2  # MoCo v2 random-grayscale probability
    # mocov2: the MoCo v2 pipeline above; ring_official: the ring code's default transforms (crop,
    # grayscale p=0.2, ColorJitter(0.4, 0.4, 0.4, 0.4) on every image, flip; no blur)
    augmentation: str = "mocov2"
    crop_scale_min: float = 0.2  # RandomResizedCrop scale=(crop_scale_min, 1)
    mean: Optional[list[float]] = None  # input normalisation; null: the dataset's own statistics
    std: Optional[list[float]] = None
    stl10_split: str = "train+unlabeled"  # STL-10 pretraining images (the official ring code: "train")


@dataclass
class LossConfig:
    name: str = "ring"
    t: float = 0.07
    w_outer: float = 0.1
    w_inner: float = 0.1
    num_samples: Optional[int] = None  # ring IR flavour: negatives drawn from the ring (null: whole ring)
    schedule: str = "constant"
    w_outer_start: float = 1.0
    anneal_epochs: int = 100
    schedule_steps: int = 4
    tau_plus: float = 0.1
    beta: float = 1.0
    beta_anneal_epochs: int = 0  # HCL: anneal beta linearly to 0 over this many epochs (0: off)
    estimator: str = "hard"
    rounding: str = "eps"  # ring bounds: floor(w*K + 1e-9) ("eps") or the official int(w*K) ("int")
    schedule_style: str = "epoch"  # w_outer per epoch ("epoch") or the official per-iteration policies
    beta_anneal_steps: int = 0  # HCL: 0 anneals beta linearly per epoch; N: HCL's N-step schedule


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"
    milestones: list[float] = field(default_factory=lambda: [0.68, 0.83])  # fractions of training
    gamma: float = 0.1
    milestone_rounding: str = "exact"  # drop at epoch >= m*E ("exact") or >= int(m*E) (official)


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 256
    seed: int = 0
    amp: bool = True  # CUDA only
    channels_last: bool = True  # CUDA only
    log_every: int = 20
    max_steps_per_epoch: Optional[int] = None


@dataclass
class KnnConfig:
    enabled: bool = True
    k: int = 200
    t: float = 0.07
    every: int = 1
    max_train: int = 5000
    max_test: int = 1000


@dataclass
class CommonConfig:
    """The keys every pretraining config holds, whatever its method, with their types and defaults."""

    method: str = "moco"
    arch: str = "resnet18"
    stem: str = "auto"  # auto: "cifar" for images up to 96 px, "imagenet" above
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)


@functools.cache
def pretrain_schema() -> type:
    """Every key a pretraining config may hold: :class:`CommonConfig` plus each registered method's
    section (``cfg["moco"]``, ...), whose fields declare their ranges."""
    from pretrain.methods.registry import config_sections

    sections = [(name, section, field(default_factory=section)) for name, section in config_sections().items()]
    return dataclasses.make_dataclass("PretrainConfig", sections, bases=(CommonConfig,))


@functools.cache
def _defaults() -> dict[str, Any]:
    return dataclasses.asdict(pretrain_schema()())


def __getattr__(name: str) -> Any:
    """``PretrainConfig`` (the schema) and ``DEFAULTS`` (its defaults as a plain dict, read-only by
    convention): built from the method registry on first use."""
    if name == "PretrainConfig":
        return pretrain_schema()
    if name == "DEFAULTS":
        return _defaults()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Small, fast settings for a CPU demo (`--profile demo`): ResNet-18 on 32-px synthetic shapes in a
# few minutes on 2 cores. Colour defines a third of each synthetic class, so the demo keeps hue out of
# the colour jitter. Random grayscale stays (p=0.2): each image's background gradient is a colour no
# other image shares, and without grayscale it survives every view, so instance discrimination with
# uniform negatives (SimCLR, DCL) learns the background and ends below a random network on the kNN
# monitor. The short run wants a faster-moving MoCo key encoder.
PROFILES: dict[str, dict[str, Any]] = {
    "demo": {
        "data.workers": 0,
        "data.synthetic_classes": 64,
        "data.synthetic_images_per_class": 10,
        "data.synthetic_image_size": 32,
        "data.jitter_hue": 0.0,
        "train.epochs": 4,
        "train.batch_size": 64,
        "train.log_every": 2,
        "optim.schedule": "cosine",
        "moco.momentum": 0.99,
        "moco.queue_size": 4096,
        "moco.shuffle_groups": 2,
        "ir.num_negatives": 256,
        "cmc.num_negatives": 256,
        "knn.every": 1000,
        "knn.max_train": 640,
        "knn.max_test": 192,
        "knn.k": 20,
    },
}


def load_config(
    path: str | os.PathLike | None,
    overrides: Iterable[str] = (),
    profile: str | None = None,
    flags: Mapping[str, Any] | None = None,
    need_data: bool = True,
) -> dict:
    """Defaults <- YAML file (a path, or a shipped config's name) <- profile <- command-line flags
    (dotted keys) <- ``key=value`` overrides, then :func:`validate_config`; with ``need_data`` (a run, not
    ``--print-config``) a data set on disk must have its root."""
    layers: list[Layer] = []
    if path is not None:
        path = find_config(path, "pretrain")
        layers.append((str(path), read_yaml_mapping(path, "config file")))
    if profile is not None:
        if profile not in PROFILES:
            raise UserError(f"unknown profile {profile!r}; available: {sorted(PROFILES)}")
        layers.append((f"profile {profile}", _nested(PROFILES[profile])))
    if flags:
        layers.append(("command-line flags", _nested(flags)))
    cfg = compose(pretrain_schema(), layers, overrides)
    validate_config(cfg)
    if need_data and cfg["data"]["name"] not in ("synthetic",) and not cfg["data"]["root"]:
        raise UserError(f"config: dataset {cfg['data']['name']!r} needs data.root (or --data-root)")
    return cfg


def _nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"config: unknown {name} {value!r}; expected one of {list(choices)}")


def validate_config(cfg: Mapping) -> None:
    """Cross-field checks; every problem is a one-line :class:`UserError` before any work starts."""
    from pretrain.losses import RING_ROUNDINGS, check_temperature
    from pretrain.methods.registry import loss_names, method_classes
    from ringbench.ring_schedules import RING_SCHEDULE_STYLES, RING_SCHEDULES, check_ring

    methods = method_classes()
    _choice("method", cfg["method"], methods)
    method, loss = methods[cfg["method"]], cfg["loss"]
    _choice("loss", loss["name"], loss_names())
    if loss["name"] not in method.accepted_losses:
        raise UserError(
            f"config: loss {loss['name']!r} does not apply to method {cfg['method']!r}; "
            f"use one of {list(method.accepted_losses)}"
        )
    _choice("data.name", cfg["data"]["name"], DATASETS)
    _choice("stem", cfg["stem"], ("auto", "cifar", "imagenet"))
    _choice("optim.name", cfg["optim"]["name"], OPTIMIZERS)
    _choice("optim.schedule", cfg["optim"]["schedule"], LR_SCHEDULES)
    _choice("loss.schedule", loss["schedule"], RING_SCHEDULES)
    _choice("loss.schedule_style", loss["schedule_style"], RING_SCHEDULE_STYLES)
    _choice("loss.rounding", loss["rounding"], RING_ROUNDINGS)
    _choice("data.augmentation", cfg["data"]["augmentation"], AUGMENTATIONS)
    _choice("data.stl10_split", cfg["data"]["stl10_split"], STL10_SPLITS)
    _choice("optim.milestone_rounding", cfg["optim"]["milestone_rounding"], MILESTONE_ROUNDINGS)
    for key in ("mean", "std"):
        value = cfg["data"][key]
        if value is not None and (len(value) != 3 or (key == "std" and min(value) <= 0)):
            raise UserError(f"config: data.{key} must be three numbers (one per RGB channel){', > 0' * (key == 'std')}")
    check_temperature(loss["t"])
    if loss["name"] == "ring":
        check_ring(loss["w_outer"], loss["w_inner"], loss["num_samples"])
        check_ring(loss["w_outer_start"], 0.0)
    if cfg["arch"] not in TORCHVISION_RESNETS:
        import timm

        if not timm.is_model(cfg["arch"]):
            raise UserError(
                f"config: unknown architecture {cfg['arch']!r}; use {list(TORCHVISION_RESNETS)} or a timm name"
            )
    for name, (low, high) in RANGES.items():  # (every float is already finite: compose checks it)
        section, _, key = name.rpartition(".")
        value = cfg[section][key] if section else cfg[key]
        if value is not None or name not in NULLABLE:
            check_range(f"config: {name}", value, low, high)
    if any(not 0 < m < 1 for m in cfg["optim"]["milestones"]):
        raise UserError(
            f"config: optim.milestones are fractions of training in (0, 1), got {cfg['optim']['milestones']}"
        )
    method.check_config(cfg)


# The range of every bounded number of the common keys (ringbench.config.check_range): (low, high);
# a bound in a 1-tuple is exclusive, None is unbounded. A method's section declares its own ranges.
_POS = ((0,), None)  # > 0
_NONNEG = (0, None)  # >= 0
_FRACTION = (0, 1)  # [0, 1]
RANGES: dict[str, tuple[Any, Any]] = {
    "train.epochs": _POS,
    "train.batch_size": _POS,
    "train.seed": _NONNEG,
    "train.log_every": _POS,
    "train.max_steps_per_epoch": _POS,
    "optim.lr": _POS,
    "optim.momentum": (0, (1,)),
    "optim.weight_decay": _NONNEG,
    "optim.gamma": _POS,
    "data.image_size": _POS,
    "data.workers": _NONNEG,
    "data.synthetic_classes": _POS,
    "data.synthetic_images_per_class": _POS,
    "data.synthetic_image_size": _POS,
    "data.color_jitter": _FRACTION,
    "data.jitter_hue": (0, 0.5),
    "data.grayscale": _FRACTION,
    "data.crop_scale_min": ((0,), 1),
    "loss.anneal_epochs": _NONNEG,
    "loss.schedule_steps": _POS,
    "loss.tau_plus": (0, (1,)),
    "loss.beta": _NONNEG,
    "loss.beta_anneal_epochs": _NONNEG,
    "loss.beta_anneal_steps": _NONNEG,
    "knn.k": _POS,
    "knn.t": _POS,
    "knn.every": _POS,
    "knn.max_train": _POS,
    "knn.max_test": _POS,
}
NULLABLE = frozenset({"train.max_steps_per_epoch", "data.image_size"})  # null: the whole epoch, native size


def resolved_stem(cfg: Mapping, image_size: int) -> str:
    """``stem: auto`` -> ``"cifar"`` for 32-96 px images (the transfer stage expects it), else ``"imagenet"``."""
    if cfg["stem"] != "auto":
        return cfg["stem"]
    return "cifar" if image_size <= 96 and cfg["arch"] in TORCHVISION_RESNETS else "imagenet"
