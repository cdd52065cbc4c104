"""Checkpoint layouts that are not torchvision's, for ``transfer.checkpoints.SOURCE_FORMATS``.

:func:`detect_format` tells a checkpoint's format from its containers and keys. Each key-map function
takes one key of a foreign ResNet (after the format's prefix is removed) and returns the torchvision
key it holds, or ``None`` when the key is not part of the backbone (the strict check then reports it
unless it is a known head). Tensors are converted by :func:`convert_tensor` where the layout differs
(Haiku stores convolutions as ``HWIO`` and batch-norm parameters as ``(1, 1, 1, C)``).

- ``byol_key``: BYOL's Haiku parameters (google-deepmind/deepmind-research ``byol/utils/networks.py``,
  ``ResNetTorso``: ``initial_conv``, ``initial_batchnorm``, ``block_group_G/~/block_B/~/conv_K``,
  ``batchnorm_K``, ``shortcut_conv``, ``shortcut_batchnorm``; batch-norm statistics in the state as
  ``.../~/mean_ema/average`` and ``.../~/var_ema/average``). The same mapping, by module order, is
  ssl-transfer's ``convert_byol`` (``download_and_prepare_models.py``).
- ``simclr_v2_key``: Separius/SimCLRv2-Pytorch ``resnet.py`` (``net.0`` the stem, ``net.1..4`` the
  stages of ``blocks``, each block a ``net`` sequence conv/BN-ReLU pairs and a ``projection``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ringbench.errors import UserError
from ringbench.resnets import TORCHVISION_RESNETS

# Wrappers that training code adds around any model (DataParallel/DDP, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_BYOL_BN_STATE = re.compile(r"^(.*)/~/(mean_ema|var_ema)/(hidden|counter)$")


def _byol_module(module: str) -> str | None:
    """A Haiku module path (without the network's root) -> torchvision module name."""
    if module == "initial_conv":
        return "conv1"
    if module == "initial_batchnorm":
        return "bn1"
    match = re.fullmatch(
        r"block_group_(\d)/~/block_(\d+)/~/(conv_(\d)|batchnorm_(\d)|shortcut_conv|shortcut_batchnorm)", module
    )
    if match is None:
        return None
    group, block, part, conv, bn = match.groups()
    layer = f"layer{int(group) + 1}.{int(block)}"
    if conv is not None:
        return f"{layer}.conv{int(conv) + 1}"
    if bn is not None:
        return f"{layer}.bn{int(bn) + 1}"
    return f"{layer}.downsample.{0 if part == 'shortcut_conv' else 1}"


def byol_key(key: str) -> str | None:
    """``res_net50/~/block_group_0/~/block_0/~/conv_0/w`` -> ``layer1.0.conv1.weight``."""
    _root, sep, rest = key.partition("/~/")
    match = re.fullmatch(r"(.+?)(?:/~/(mean_ema|var_ema)/average|/(w|scale|offset))", rest) if sep else None
    if match is None:
        return None
    module, ema, param = match.groups()
    name = _byol_module(module)
    if name is None:
        return None
    is_conv = name.rsplit(".", 1)[-1].startswith("conv") or name.endswith("downsample.0")
    if is_conv:
        return f"{name}.weight" if param == "w" else None
    field = {"scale": "weight", "offset": "bias", "mean_ema": "running_mean", "var_ema": "running_var"}
    return f"{name}.{field[param or ema]}" if (param or ema) in field else None


def byol_ignored(key: str) -> bool:
    """The EMA bookkeeping of BYOL's batch-norm statistics (``hidden``, ``counter``): not weights."""
    return _BYOL_BN_STATE.match(key) is not None


def convert_tensor(fmt: str, key: str, value: torch.Tensor) -> torch.Tensor:
    """A foreign tensor in torchvision's layout: Haiku ``HWIO`` convolutions -> ``OIHW``, and
    Haiku's broadcastable ``(1, 1, 1, C)`` batch-norm vectors -> ``(C,)``."""
    if fmt != "byol":
        return value
    if key.endswith("/w") and value.ndim == 4:
        return value.permute(3, 2, 0, 1).contiguous()
    if value.ndim > 1:
        return value.reshape(-1).contiguous()
    return value


_SIMCLR_BN = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def simclr_v2_key(key: str) -> str | None:
    """``net.1.blocks.0.net.3.0.weight`` -> ``layer1.0.bn2.weight`` (Separius's SimCLR v2, no SK)."""
    match = re.fullmatch(r"net\.0\.(\d)\.(?:(0)\.)?(\w+)", key)
    if match:
        index, bn, field = match.groups()
        if index == "0" and bn is None and field == "weight":
            return "conv1.weight"
        if index == "1" and bn == "0" and field in _SIMCLR_BN:
            return f"bn1.{field}"
        return None
    match = re.fullmatch(r"net\.([1-4])\.blocks\.(\d+)\.(.+)", key)
    if match is None:
        return None
    stage, block, rest = match.groups()
    prefix = f"layer{stage}.{block}"
    if rest == "projection.shortcut.weight":
        return f"{prefix}.downsample.0.weight"
    part = re.fullmatch(r"projection\.bn\.0\.(\w+)", rest)
    if part and part.group(1) in _SIMCLR_BN:
        return f"{prefix}.downsample.1.{part.group(1)}"
    part = re.fullmatch(r"net\.([0-5])\.(?:(0)\.)?(\w+)", rest)
    if part is None:
        return None
    index, bn, field = int(part.group(1)), part.group(2), part.group(3)
    if index % 2 == 0 and bn is None and field == "weight":
        return f"{prefix}.conv{index // 2 + 1}.weight"
    if index % 2 == 1 and bn == "0" and field in _SIMCLR_BN:
        return f"{prefix}.bn{index // 2 + 1}.{field}"
    return None


def clean_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors only, with wrapper prefixes (``module.``, ``_orig_mod.``) removed from every key."""
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def detect_format(
    path: Path, raw: Any, known: Sequence[str], dino_key: str = "teacher"
) -> tuple[str, dict[str, torch.Tensor], str | None, list[str]]:
    """The format of a checkpoint read from ``path`` (a ``SOURCE_FORMATS`` name; ``known``: those an error
    lists) -> (format, cleaned full state dict, arch recorded in the file or None, containers dropped)."""
    if not isinstance(raw, Mapping):
        raise UserError(f"{path}: not a checkpoint dict (found {type(raw).__name__})")
    if raw.get("__detectron2__"):
        return "detectron2", clean_state_dict(raw["state_dict"]), None, []
    if raw.get("__byol__"):
        return "byol", dict(raw["state_dict"]), None, list(raw.get("dropped", []))
    if isinstance(raw.get("classy_state_dict"), Mapping):
        trunk, heads = _vissl_trunk(path, raw)
        return "vissl", trunk, None, heads
    if isinstance(raw.get("teacher"), Mapping) or isinstance(raw.get("student"), Mapping):
        if dino_key not in ("teacher", "student") or not isinstance(raw.get(dino_key), Mapping):
            raise UserError(f"{path}: DINO checkpoint has no {dino_key!r} network (keys: {sorted(raw)[:8]})")
        other = "student" if dino_key == "teacher" else "teacher"
        return "dino", clean_state_dict(raw[dino_key]), None, [k for k in (other,) if k in raw]
    if isinstance(raw.get("resnet"), Mapping):
        return "simclr-v2", clean_state_dict(raw["resnet"]), None, [k for k in ("head",) if k in raw]
    arch_hint = raw.get("arch") if isinstance(raw.get("arch"), str) else None
    if arch_hint is not None and arch_hint not in TORCHVISION_RESNETS and not _is_timm(arch_hint):
        arch_hint = None
    for container in ("state_dict", "model", "state_dict_ema", "module"):
        if isinstance(raw.get(container), Mapping):
            state = clean_state_dict(raw[container])
            break
    else:
        state = clean_state_dict(raw)
    if not state:
        raise UserError(f"{path}: no tensors found; not a model checkpoint")
    keys = list(state)

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    lightning = "pytorch-lightning_version" in raw or "hyper_parameters" in raw
    if has("_feature_blocks."):
        return "vissl", state, arch_hint, []
    if has("encoder_q."):
        return "moco", state, arch_hint, []
    if has("base_encoder."):
        return "mocov3", state, arch_hint, []
    if has("backbone."):
        return ("solo-learn" if lightning else "mmselfsup"), state, arch_hint, []
    if has("encoder.") and not has("conv1.", "layer1."):
        return "pycontrast", state, arch_hint, []
    if lightning or has("model."):
        return "lightning", state, arch_hint, []
    if has("net.0.0."):
        return "simclr-v2", state, arch_hint, []
    if has("stem.", "res2.", "backbone.bottom_up."):
        return "detectron2", state, None, []
    if arch_hint and arch_hint not in TORCHVISION_RESNETS:
        return "timm", state, arch_hint, []
    if "conv1.weight" in state and has("layer1."):
        return ("swav" if has("projection_head.", "prototypes.") else "torchvision"), state, arch_hint, []
    raise UserError(
        f"{path}: unrecognised checkpoint layout (first keys: {keys[:5]}); supported: "
        f"{', '.join(known)} (see docs/formats.md)"
    )


def _vissl_trunk(path: Path, raw: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """VISSL: ``classy_state_dict`` -> ``base_model`` -> ``model`` -> ``trunk``; ``heads`` dropped."""
    model: Any = raw["classy_state_dict"]
    for step in ("base_model", "model"):
        model = model.get(step) if isinstance(model, Mapping) else None
        if model is None:
            raise UserError(f"{path}: VISSL checkpoint has no classy_state_dict.base_model.model ({step!r} missing)")
    trunk = model.get("trunk")
    if not isinstance(trunk, Mapping) or not trunk:
        raise UserError(f"{path}: VISSL checkpoint has no trunk in classy_state_dict.base_model.model")
    heads = model.get("heads") or {}
    return clean_state_dict(trunk), [f"heads.{k}" for k in heads]


def _is_timm(arch: str) -> bool:
    try:
        import timm
    except ImportError:  # pragma: no cover
        return False
    return bool(timm.is_model(arch))
