"""torchvision ResNet keys -> Detectron2 ResNet keys, and a checked load into a Detectron2 model.

Mapping (the same for basic blocks, ResNet-18/34, and bottlenecks, ResNet-50/101/152)::

    conv1.weight                 -> stem.conv1.weight
    bn1.*                        -> stem.conv1.norm.*
    layerN.B.convK.weight        -> res{N+1}.B.convK.weight
    layerN.B.bnK.*               -> res{N+1}.B.convK.norm.*
    layerN.B.downsample.0.weight -> res{N+1}.B.shortcut.weight
    layerN.B.downsample.1.*      -> res{N+1}.B.shortcut.norm.*

torchvision bottlenecks stride in the 3x3 conv, hence ``RESNETS.STRIDE_IN_1X1: False``. Where the
converted weights go in a detector depends on its layout: FPN models hold the whole ResNet under
``backbone.bottom_up.``; C4 models hold stem..res4 under ``backbone.`` and res5 in the box head,
``roi_heads.res5.``. Loading is checked: every ResNet key of the model must be filled and every
converted key must land (with the same shape), otherwise :class:`UserError` lists the keys.

Nothing here imports Detectron2: it works on state dicts and any ``nn.Module``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ringbench.errors import UserError, preview

LAYOUTS = ("fpn", "c4")
# A Detectron2 ResNet parameter/buffer: the stem, or a block's convs and shortcut (with their norms).
_D2_RESNET_KEY = re.compile(r"^(stem\.conv1\.|res[2-5]\.\d+\.(conv\d|shortcut)\.)")
_TV_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")


def _block_key(rest: str) -> str:
    """Key inside one residual block: ``bnK`` -> ``convK.norm``, ``downsample.0/1`` -> ``shortcut(.norm)``."""
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
    return re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)


def resnet_key(key: str) -> str:
    """One torchvision ResNet key as Detectron2 names it inside its ``ResNet`` module."""
    if key.startswith("conv1."):
        return "stem." + key
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[len("bn1.") :]
    match = _TV_BLOCK.match(key)
    if match is None:
        raise UserError(f"backbone key {key!r} is not a torchvision ResNet key (conv1, bn1, layer1..4)")
    stage, block, rest = match.groups()
    return f"res{int(stage) + 1}.{block}.{_block_key(rest)}"


_D2_BLOCK = re.compile(r"^res([2-5])\.(\d+)\.(.+)$")
# Where a full model keeps its ResNet (inverse of ``place``): FPN trunk, C4 trunk, C4 head's res5.
_PLACES = ("backbone.bottom_up.", "backbone.", "roi_heads.")


def torchvision_key(key: str) -> str | None:
    """Inverse of :func:`resnet_key`: a Detectron2 ResNet key as torchvision names it (None if not one)."""
    if key.startswith("stem.conv1.norm."):
        return "bn1." + key[len("stem.conv1.norm.") :]
    if key.startswith("stem.conv1."):
        return "conv1." + key[len("stem.conv1.") :]
    match = _D2_BLOCK.match(key)
    if match is None:
        return None
    stage, block, rest = match.groups()
    rest = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", rest)
    rest = re.sub(r"^shortcut\.norm\.", "downsample.1.", rest)
    rest = re.sub(r"^shortcut\.", "downsample.0.", rest)
    return f"layer{int(stage) - 1}.{block}.{rest}"


def detectron2_to_torchvision(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`torchvision_to_detectron2` for a backbone or a whole FPN/C4 model.

    Keys that are not ResNet keys are kept unchanged, so that strict loading reports them.
    """
    out = {}
    for key, value in state.items():
        bare = next((key[len(p) :] for p in _PLACES if key.startswith(p) and torchvision_key(key[len(p) :])), key)
        out[torchvision_key(bare) or key] = value
    return out


def place(key: str, layout: str) -> str:
    """Where a Detectron2 ResNet key lives in a full model of ``layout`` (``fpn`` or ``c4``)."""
    if layout == "fpn":
        return "backbone.bottom_up." + key
    if layout == "c4":
        return ("roi_heads." + key) if key.startswith("res5.") else ("backbone." + key)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def torchvision_to_detectron2(state: Mapping[str, torch.Tensor], layout: str | None = None) -> dict[str, torch.Tensor]:
    """Convert a torchvision ResNet state dict; with ``layout``, keys are full-model keys."""
    out = {}
    for key, value in state.items():
        new = resnet_key(key)
        out[place(new, layout) if layout else new] = value
    return out


def resnet_keys_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ResNet parameters and buffers of a Detectron2 model (or backbone): stem and blocks.

    Any extra head modules (FPN, an extra norm after res5, box heads) are not ResNet keys.
    """
    out = {}
    for key, value in model.state_dict().items():
        local = key
        for prefix in ("backbone.bottom_up.", "backbone.", "roi_heads.", "bottom_up."):
            if local.startswith(prefix):
                local = local[len(prefix) :]
                break
        if _D2_RESNET_KEY.match(local):
            out[key] = value
    return out


def load_converted(model: nn.Module, converted: Mapping[str, torch.Tensor], source: str = "backbone") -> list[str]:
    """Load converted weights into ``model``, checked both ways; return the keys loaded.

    ``num_batches_tracked`` counters are dropped where the model's norm has none (frozen BN)
    and zero-filled where the checkpoint lacks them. Anything else unmatched is an error.
    """
    expected = resnet_keys_of(model)
    state = {k: v for k, v in converted.items() if not (k.endswith("num_batches_tracked") and k not in expected)}
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} Detectron2 backbone keys not filled {preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} converted keys with no place in the model {preview(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches {preview(shapes)}")
        raise UserError(f"{source}: weights do not convert to the Detectron2 backbone: " + "; ".join(parts))
    result = model.load_state_dict(state, strict=False)
    leftover = [k for k in result.missing_keys if k in expected] + list(result.unexpected_keys)
    if leftover:  # cannot happen after the checks above; kept as the final guard
        raise UserError(f"{source}: Detectron2 did not take keys {preview(sorted(leftover))}")
    return sorted(state)
