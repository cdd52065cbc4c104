"""Pretraining configuration: YAML file -> defaults merged -> ``key=value`` overrides -> validated dict.

The schema is :data:`DEFAULTS`: every key a config may hold, with its default. A key that is not
in the schema is an error (a typo never silently falls back to a default). Values are plain
YAML; an override's value is parsed as YAML too (``train.epochs=5``, ``loss.num_samples=null``,
``optim.milestones=[0.5,0.8]``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from pretrain.cli import UserError

METHODS = ("ir", "moco", "cmc", "simclr")
LOSSES = ("nce", "ring", "ntxent", "hcl", "dcl")
METHOD_LOSSES = {
    "ir": ("nce", "ring"),
    "moco": ("nce", "ring"),
    "cmc": ("nce", "ring"),
    "simclr": ("ntxent", "ring", "hcl", "dcl"),
}
DATASETS = ("synthetic", "cifar10", "cifar100", "stl10", "imagefolder")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("step", "cosine", "constant")

# Every key a config may hold. ``None`` means "no default; any value of the right kind, or null".
DEFAULTS: dict[str, Any] = {
    "method": "moco",
    "arch": "resnet18",
    "stem": "auto",  # auto: "cifar" for images up to 96 px, "imagenet" above
    "data": {
        "name": "synthetic",
        "root": None,
        "image_size": None,  # null: the dataset's native size (32 CIFAR, 96 STL-10, 224 ImageNet)
        "workers": 2,
        "synthetic_classes": 64,
        "synthetic_images_per_class": 100,
        "synthetic_image_size": 32,
        "synthetic_seed": 0,
        "blur": None,  # null: Gaussian blur for images of 96 px and above (MoCo v2)
        "color_jitter": 0.8,  # probability of the MoCo v2 colour jitter (CMC: 0, its ab view needs colour)
        "jitter_hue": 0.1,  # MoCo v2 colour jitter hue; 0 keeps colour a usable cue
        "grayscale": 0.2,  # MoCo v2 random-grayscale probability
    },
    "loss": {
        "name": "ring",
        "t": 0.07,
        "w_outer": 0.1,
        "w_inner": 0.1,
        "num_samples": None,  # ring IR flavour: negatives drawn from the ring (null: whole ring)
        "schedule": "constant",
        "w_outer_start": 1.0,
        "anneal_epochs": 100,
        "schedule_steps": 4,
        "tau_plus": 0.1,
        "beta": 1.0,
        "beta_anneal_epochs": 0,  # HCL: anneal beta linearly to 0 over this many epochs (0: off)
        "estimator": "hard",
    },
    "moco": {"momentum": 0.999, "queue_size": 65536, "head_dim": 128, "mlp": True, "shuffle_groups": 8},
    "ir": {"bank_momentum": 0.5, "num_negatives": 4096, "head_dim": 128},
    "cmc": {"bank_momentum": 0.5, "num_negatives": 4096, "head_dim": 128, "width": 0.5},
    "simclr": {"head_dim": 128, "hidden_dim": 512},
    "optim": {
        "name": "sgd",
        "lr": 0.03,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "schedule": "step",
        "milestones": [0.68, 0.83],  # fractions of training
        "gamma": 0.1,
    },
    "train": {
        "epochs": 200,
        "batch_size": 256,
        "seed": 0,
        "amp": True,  # CUDA only
        "channels_last": True,  # CUDA only
        "log_every": 20,
        "max_steps_per_epoch": None,
    },
    "knn": {"enabled": True, "k": 200, "t": 0.07, "every": 1, "max_train": 5000, "max_test": 1000},
}

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


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = (), profile: str | None = None) -> dict:
    """Defaults <- YAML file <- profile <- overrides, then :func:`validate_config`."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        merge_into(cfg, read_yaml_mapping(path, "config file"), DEFAULTS, source=str(path))
    if profile is not None:
        if profile not in PROFILES:
            raise UserError(f"unknown profile {profile!r}; available: {sorted(PROFILES)}")
        for key, value in PROFILES[profile].items():
            set_key(cfg, key, value, source=f"profile {profile}")
    for item in overrides:
        key, value = parse_override(item)
        set_key(cfg, key, value, source=f"override {item!r}")
    validate_config(cfg)
    return cfg


def read_yaml_mapping(path: str | os.PathLike, what: str = "file") -> dict:
    """A YAML file that must hold a mapping (configs, plans, settings); clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:160]})") from exc
    if not isinstance(data, Mapping):
        raise UserError(f"{path}: a {what} must be a YAML mapping, got {type(data).__name__}")
    return dict(data)


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"override {item!r} must look like key=value (e.g. train.epochs=5)")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise UserError(f"override {item!r}: value is not valid YAML") from exc
    return key.strip(), value


def merge_into(cfg: dict, data: Mapping, schema: Mapping, source: str, prefix: str = "") -> None:
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in schema:
            raise UserError(f"{source}: unknown config key {name!r}; known keys here: {sorted(schema)}")
        if isinstance(schema[key], dict):
            if not isinstance(value, Mapping):
                raise UserError(f"{source}: {name!r} must be a mapping of {sorted(schema[key])}")
            merge_into(cfg[key], value, schema[key], source, prefix=f"{name}.")
        else:
            cfg[key] = _checked(name, value, schema[key], source)


def set_key(cfg: dict, dotted: str, value: Any, source: str) -> None:
    """Set one dotted key (``loss.w_outer``) through :func:`merge_into`, checked as a YAML file is."""
    for part in reversed(dotted.split(".")):
        value = {part: value}
    merge_into(cfg, value, DEFAULTS, source)


def _checked(name: str, value: Any, default: Any, source: str) -> Any:
    """Type-check ``value`` against the default's kind (ints are accepted for floats)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = True
    if not ok:
        raise UserError(f"{source}: {name!r} must be a {type(default).__name__}, got {value!r}")
    return value


def _choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"config: unknown {name} {value!r}; expected one of {list(choices)}")


def validate_config(cfg: Mapping) -> None:
    """Cross-field checks; every problem is a one-line :class:`UserError` before any work starts."""
    from pretrain.backbones import TORCHVISION_RESNETS
    from pretrain.losses import RING_SCHEDULES, check_ring, check_temperature

    _choice("method", cfg["method"], METHODS)
    loss = cfg["loss"]
    _choice("loss", loss["name"], LOSSES)
    if loss["name"] not in METHOD_LOSSES[cfg["method"]]:
        raise UserError(
            f"config: loss {loss['name']!r} does not apply to method {cfg['method']!r}; "
            f"use one of {list(METHOD_LOSSES[cfg['method']])}"
        )
    _choice("data.name", cfg["data"]["name"], DATASETS)
    _choice("stem", cfg["stem"], ("auto", "cifar", "imagenet"))
    _choice("optim.name", cfg["optim"]["name"], OPTIMIZERS)
    _choice("optim.schedule", cfg["optim"]["schedule"], LR_SCHEDULES)
    _choice("loss.schedule", loss["schedule"], RING_SCHEDULES)
    check_temperature(loss["t"])
    if loss["name"] == "ring":
        check_ring(loss["w_outer"], loss["w_inner"], loss["num_samples"])
        check_ring(loss["w_outer_start"], 0.0)
    if cfg["arch"] not in TORCHVISION_RESNETS:
        import timm

        if not timm.is_model(cfg["arch"]):
            raise UserError(f"config: unknown architecture {cfg['arch']!r}; use {list(TORCHVISION_RESNETS)} or a timm name")
    positive = {
        "train.epochs": cfg["train"]["epochs"],
        "train.batch_size": cfg["train"]["batch_size"],
        "optim.lr": cfg["optim"]["lr"],
        "knn.k": cfg["knn"]["k"],
        "moco.queue_size": cfg["moco"]["queue_size"],
        "moco.shuffle_groups": cfg["moco"]["shuffle_groups"],
        "ir.num_negatives": cfg["ir"]["num_negatives"],
        "cmc.num_negatives": cfg["cmc"]["num_negatives"],
        "cmc.width": cfg["cmc"]["width"],
        "data.synthetic_classes": cfg["data"]["synthetic_classes"],
        "data.synthetic_images_per_class": cfg["data"]["synthetic_images_per_class"],
    }
    for name, value in positive.items():
        if value <= 0:
            raise UserError(f"config: {name} must be > 0, got {value}")
    for name in ("moco.momentum", "ir.bank_momentum", "cmc.bank_momentum"):
        section, key = name.split(".")
        if not 0 <= cfg[section][key] < 1:
            raise UserError(f"config: {name} must be in [0, 1), got {cfg[section][key]}")
    if any(not 0 < m < 1 for m in cfg["optim"]["milestones"]):
        raise UserError(f"config: optim.milestones are fractions of training in (0, 1), got {cfg['optim']['milestones']}")
    if cfg["train"]["batch_size"] < 2 and cfg["method"] == "simclr":
        raise UserError("config: SimCLR needs train.batch_size >= 2 (in-batch negatives)")
    if cfg["data"]["name"] not in ("synthetic",) and not cfg["data"]["root"]:
        raise UserError(f"config: dataset {cfg['data']['name']!r} needs data.root (or --data-root)")


def resolved_stem(cfg: Mapping, image_size: int) -> str:
    """``stem: auto`` -> ``"cifar"`` for 32-96 px images (the transfer stage expects it), else ``"imagenet"``."""
    if cfg["stem"] != "auto":
        return cfg["stem"]
    from pretrain.backbones import TORCHVISION_RESNETS

    return "cifar" if image_size <= 96 and cfg["arch"] in TORCHVISION_RESNETS else "imagenet"
