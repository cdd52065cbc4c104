"""The one architecture factory: ``create_backbone(arch, stem)`` -> a feature extractor.

ResNets come from torchvision (keys ``conv1``, ``bn1``, ``layer1..4``), with the classifier
replaced by ``Identity`` so that ``model(x)`` returns pooled features. ``stem="cifar"`` is the
small-image stem used for 32-96 px data (3x3 stride-1 first conv, no max-pool). Any other name
is created with timm (``num_classes=0``), never with pretrained weights.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.cli import UserError

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
RESNET_FEATURE_DIM = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}


def create_backbone(arch: str, stem: str = "imagenet") -> nn.Module:
    """Randomly initialised backbone whose forward returns ``(N, feature_dim)`` pooled features.

    The module has a ``feature_dim`` attribute.
    """
    if stem not in ("imagenet", "cifar"):
        raise UserError(f"unknown stem {stem!r}; expected 'imagenet' or 'cifar'")
    if arch in TORCHVISION_RESNETS:
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None)
        if stem == "cifar":
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        model.fc = nn.Identity()
        model.feature_dim = RESNET_FEATURE_DIM[arch]
        return model
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm is a dependency
        raise UserError(f"architecture {arch!r} needs timm, which is not installed") from exc
    if not timm.is_model(arch):
        raise UserError(
            f"unknown architecture {arch!r}; use one of {list(TORCHVISION_RESNETS)} or a timm model name"
        )
    if stem == "cifar":
        raise UserError(f"stem 'cifar' is only defined for torchvision ResNets, not {arch!r}")
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    model.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return model


def backbone_keys(arch: str, stem: str = "imagenet") -> set[str]:
    """The state-dict keys a backbone of this arch has (what strict loading expects)."""
    with torch.device("meta"):
        model = create_backbone(arch, stem)
    return set(model.state_dict().keys())


def create_multistream(arch: str, stem: str, meta: dict) -> nn.Module:
    """The model of a multi-stream card (CMC: Lab ``l`` and ``ab`` streams, RGB in, features concatenated)."""
    from pretrain.methods.cmc import create_two_stream

    return create_two_stream(arch, stem, meta)
