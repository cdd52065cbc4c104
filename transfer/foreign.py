"""Key maps for checkpoint layouts that are not torchvision's, used by ``SOURCE_FORMATS``.

Each function takes one key of a foreign ResNet-50 (after the format's prefix is removed) and
returns the torchvision key it holds, or ``None`` when the key is not part of the backbone (the
strict check then reports it unless it is a known head). Tensors are converted by
:func:`convert_tensor` where the layout differs (Haiku stores convolutions as ``HWIO`` and
batch-norm parameters as ``(1, 1, 1, C)``).

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

import torch

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
