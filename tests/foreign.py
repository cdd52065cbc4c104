"""Checkpoints in other projects' layouts, built around a torchvision ResNet state dict.

Each builder wraps ``state`` (torchvision keys, no fc) with the key names the project's own code
writes (the file cited in ``transfer.checkpoints.SOURCE_FORMATS[fmt].source``), adds that project's
heads, and writes the file as that project does (``torch.save``, or a pickle for BYOL). ``extra``
keys go where the project keeps its backbone's siblings (to test that foreign ones are refused).
"""

from __future__ import annotations

import argparse
import functools
import math
import pickle
import re
import sys
import types
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

# format -> the architectures its project publishes (Separius's SimCLR v2 has bottlenecks only)
FORMATS = (
    "vissl",
    "solo-learn",
    "mmselfsup",
    "mocov3",
    "dino",
    "swav",
    "deepcluster-v2",
    "pycontrast",
    "pirl",
    "pcl",
    "byol",
    "simclr-v1",
    "simclr-v2",
)
BOTTLENECK_ONLY = ("simclr-v2",)
# the SOURCE_FORMATS entry each builder's file is read by
READ_AS = {"deepcluster-v2": "swav", "pirl": "pycontrast", "pcl": "moco"}


def random_state(arch: str = "resnet18", stem: str = "imagenet", seed: int = 0) -> dict[str, torch.Tensor]:
    """A random torchvision ResNet state (He-scaled convolutions, BN near identity), made in a fraction of
    the time torchvision's initialisation takes: one per (arch, stem, seed) and session; a copy each call."""
    return {k: v.clone() for k, v in _random_state(arch, stem, seed).items()}


@functools.lru_cache(maxsize=4)
def _random_state(arch: str, stem: str, seed: int) -> dict[str, torch.Tensor]:
    from ringbench.backbones import backbone_shapes

    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in backbone_shapes(arch, stem).items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros((), dtype=torch.long)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=generator) + 0.5
        elif key.endswith(("running_mean", ".bias")):
            out[key] = 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:
            out[key] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            out[key] = torch.randn(shape, generator=generator) * math.sqrt(2 / math.prod(shape[1:]))
    return out


def model_with(arch: str, state: dict[str, torch.Tensor], stem: str = "imagenet") -> torch.nn.Module:
    """The torchvision backbone holding ``state``'s tensors (built on the meta device: no initialisation)."""
    from ringbench.backbones import create_backbone

    with torch.device("meta"):
        model = create_backbone(arch, stem)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _t(*shape: int) -> torch.Tensor:
    return torch.full(shape, 0.5)


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def write_foreign(
    fmt: str, state: dict[str, torch.Tensor], folder: Path, extra: dict | None = None, protocol: int = 2
) -> tuple[Path, dict]:
    """Write ``state`` as ``fmt`` writes it -> (path, the load_backbone keyword arguments it needs). BYOL's
    pickle is protocol 2 as its checkpointer writes it (``protocol``: a faster one where that is not the point)."""
    if fmt == "byol":
        path = folder / "byol.pkl"
        _write_byol(path, state, dict(extra or {}), protocol)
        return path, {}
    obj, kwargs = build_foreign(fmt, state, extra)
    path = folder / f"{fmt}.pth"
    torch.save(obj, path)
    return path, kwargs


def build_foreign(fmt: str, state: dict[str, torch.Tensor], extra: dict | None = None) -> tuple[object, dict]:
    """``fmt``'s checkpoint object, as ``torch.load`` returns it -> (object, load_backbone keyword arguments)."""
    extra = dict(extra or {})
    kwargs: dict = {}
    arch = "resnet50" if any(".conv3." in k for k in state) else "resnet18"
    if fmt == "vissl":
        trunk = _prefixed("_feature_blocks.", state) | extra
        model = {"trunk": trunk, "heads": {"0.clf.0.weight": _t(10, 4), "0.clf.0.bias": _t(10)}}
        obj: object = {
            "phase_idx": 3,
            "iteration": 10,
            "classy_state_dict": {"base_model": {"model": model, "meta": {}}},
        }
    elif fmt == "solo-learn":
        sd = _prefixed("backbone.", state) | _prefixed("momentum_backbone.", state)
        sd |= {"projector.0.weight": _t(8, 4), "classifier.weight": _t(10, 4), "momentum_projector.0.weight": _t(8, 4)}
        sd |= {"queue": _t(2, 8), "queue_ptr": torch.zeros(1, dtype=torch.long)}
        obj = {
            "epoch": 1,
            "pytorch-lightning_version": "2.0.0",
            "hyper_parameters": {"name": "mocov2plus"},
            "state_dict": sd | extra,
        }
    elif fmt == "mmselfsup":
        sd = _prefixed("backbone.", state) | {"neck.mlp.0.weight": _t(8, 4), "head.predictor.weight": _t(4, 4)}
        sd |= _prefixed("momentum_encoder.module.0.", state) | {"momentum_encoder.steps": torch.zeros(1)}
        obj = {"meta": {"epoch": 200, "mmselfsup_version": "1.0.0"}, "state_dict": sd | extra}
    elif fmt == "mocov3":
        sd = _prefixed("module.base_encoder.", state) | _prefixed("module.momentum_encoder.", state)
        sd |= {"module.base_encoder.fc.0.weight": _t(8, 4), "module.predictor.0.weight": _t(8, 4)}
        obj = {"epoch": 100, "arch": arch, "state_dict": sd | extra, "optimizer": {}, "scaler": {}}
    elif fmt == "dino":
        teacher = _prefixed("module.backbone.", state) | {"module.head.last_layer.weight_g": _t(8, 1)} | extra
        student = _prefixed("module.backbone.", state) | {"module.head.mlp.0.weight": _t(8, 4)}
        obj = {"student": student, "teacher": teacher, "epoch": 1, "args": argparse.Namespace(arch=arch)}
        obj["dino_loss"] = {"center": _t(1, 8)}
    elif fmt in ("swav", "deepcluster-v2"):
        heads = {"module.projection_head.0.weight": _t(8, 4), "module.projection_head.0.bias": _t(8)}
        if fmt == "swav":
            heads["module.prototypes.weight"] = _t(16, 8)
        else:
            heads |= {f"module.prototypes.prototypes{i}.weight": _t(16, 8) for i in range(3)}
        obj = _prefixed("module.", state) | heads | extra
    elif fmt in ("pycontrast", "pirl"):
        model = _prefixed("module.encoder.", state) | {"module.head.0.weight": _t(8, 4), "module.head.0.bias": _t(8)}
        if fmt == "pirl":
            model |= {"module.head_jig.fc1.0.weight": _t(8, 4)}
        obj = {
            "opt": argparse.Namespace(arch=arch),
            "model": model | extra,
            "contrast": {"memory": _t(4, 8)},
            "epoch": 1,
        }
    elif fmt == "pcl":
        sd = _prefixed("module.encoder_q.", state) | _prefixed("module.encoder_k.", state)
        sd |= {"module.encoder_q.fc.0.weight": _t(8, 4), "module.queue": _t(8, 16), "module.queue_ptr": torch.zeros(1)}
        obj = {"epoch": 200, "arch": arch, "state_dict": sd | extra, "optimizer": {}}
    elif fmt == "simclr-v1":
        obj = {"state_dict": state | {"fc.weight": _t(1000, 4), "fc.bias": _t(1000)} | extra}
        kwargs["source_format"] = "simclr-v1"
    elif fmt == "simclr-v2":
        resnet = {_simclr_v2_key(k): v for k, v in state.items()} | {"fc.weight": _t(1000, 4), "fc.bias": _t(1000)}
        obj = {"resnet": resnet | extra, "head": {"layers.0.weight": _t(8, 4)}}
    else:
        raise ValueError(fmt)
    return obj, kwargs


def _simclr_v2_key(key: str) -> str:
    """torchvision -> Separius/SimCLRv2-Pytorch resnet.py names (the inverse of transfer.foreign.simclr_v2_key)."""
    if key == "conv1.weight":
        return "net.0.0.weight"
    if key.startswith("bn1."):
        return "net.0.1.0." + key[4:]
    stage, block, rest = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", key).groups()  # type: ignore[union-attr]
    head = f"net.{stage}.blocks.{block}."
    if rest.startswith("downsample.0."):
        return head + "projection.shortcut." + rest[len("downsample.0.") :]
    if rest.startswith("downsample.1."):
        return head + "projection.bn.0." + rest[len("downsample.1.") :]
    kind, index, field = re.fullmatch(r"(conv|bn)(\d)\.(.+)", rest).groups()  # type: ignore[union-attr]
    position = 2 * (int(index) - 1) + (kind == "bn")
    return head + f"net.{position}." + ("0." if kind == "bn" else "") + field


def _haiku_module(key: str) -> tuple[str, str]:
    """torchvision key -> (Haiku module under res_net50/~/, torchvision field)."""
    module, field = key.rsplit(".", 1)
    if module == "conv1":
        return "initial_conv", field
    if module == "bn1":
        return "initial_batchnorm", field
    stage, block, rest = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", module).groups()  # type: ignore[union-attr]
    part = {"downsample.0": "shortcut_conv", "downsample.1": "shortcut_batchnorm"}.get(rest)
    if part is None:
        kind, index = re.fullmatch(r"(conv|bn)(\d)", rest).groups()  # type: ignore[union-attr]
        part = f"{'conv' if kind == 'conv' else 'batchnorm'}_{int(index) - 1}"
    return f"block_group_{int(stage) - 1}/~/block_{block}/~/{part}", field


class _ByolExperimentState(NamedTuple):
    online_params: dict
    target_params: dict
    online_state: dict
    target_state: dict
    opt_state: tuple


class LarsState(NamedTuple):
    mu: dict


def _write_byol(path: Path, state: dict[str, torch.Tensor], extra: dict, protocol: int = 2) -> None:
    """BYOL's checkpoint (byol/utils/checkpointing.py): {experiment_state, step, rng}, the state a
    ``_ByolExperimentState`` NamedTuple of Haiku params / state (module -> name -> array)."""
    params: dict[str, dict[str, np.ndarray]] = {}
    bn_state: dict[str, dict[str, np.ndarray]] = {}
    root = "res_net50/~/"
    for key, value in state.items():
        module, field = _haiku_module(key)
        array = value.numpy()
        if field == "num_batches_tracked":
            continue
        if field == "weight" and array.ndim == 4:
            params.setdefault(root + module, {})["w"] = np.ascontiguousarray(array.transpose(2, 3, 1, 0))
        elif field in ("weight", "bias"):
            params.setdefault(root + module, {})["scale" if field == "weight" else "offset"] = array.reshape(
                1, 1, 1, -1
            )
        else:
            ema = "mean_ema" if field == "running_mean" else "var_ema"
            bn_state[f"{root}{module}/~/{ema}"] = {
                "average": array.reshape(1, 1, 1, -1),
                "counter": np.zeros((), np.int32),
                "hidden": array.reshape(1, 1, 1, -1),
            }
    params["projector/~/linear"] = {"w": np.ones((4, 8), np.float32), "b": np.ones(8, np.float32)}
    params["predictor/~/linear"] = {"w": np.ones((8, 8), np.float32)}
    params["classifier"] = {"w": np.ones((4, 10), np.float32)}
    bn_state["projector/~/batch_norm/~/mean_ema"] = {"average": np.ones(8, np.float32)}
    for key, value in extra.items():
        module, _, name = key.rpartition("/")
        params.setdefault(module, {})[name] = np.asarray(value)
    fake_modules = {"byol": types.ModuleType("byol"), "byol.byol_experiment": types.ModuleType("byol.byol_experiment")}
    fake_modules["byol.utils.optimizers"] = types.ModuleType("byol.utils.optimizers")
    saved = {name: sys.modules.get(name) for name in fake_modules}
    _ByolExperimentState.__module__ = "byol.byol_experiment"
    LarsState.__module__ = "byol.utils.optimizers"
    fake_modules["byol.byol_experiment"]._ByolExperimentState = _ByolExperimentState  # type: ignore[attr-defined]
    fake_modules["byol.utils.optimizers"].LarsState = LarsState  # type: ignore[attr-defined]
    try:
        sys.modules.update(fake_modules)
        experiment = _ByolExperimentState(params, params, bn_state, bn_state, (LarsState({}),))
        with open(path, "wb") as handle:
            pickle.dump({"experiment_state": experiment, "step": 5, "rng": np.zeros(2, np.uint32)}, handle, protocol)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
