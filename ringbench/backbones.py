"""The one architecture factory: ``create_backbone(arch, stem)`` -> a feature extractor.

ResNets come from torchvision (keys ``conv1``, ``bn1``, ``layer1..4``), with the classifier
replaced by ``Identity`` so that ``model(x)`` returns pooled features. ``stem="cifar"`` is the
small-image stem used for 32-96 px data (3x3 stride-1 first conv, no max-pool). Any other name
is created with timm (``num_classes=0``), never with pretrained weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import nn

from ringbench.errors import UserError
from ringbench.resnets import RESNETS, TORCHVISION_RESNETS


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
        model.feature_dim = RESNETS[arch].feature_dim
        return model
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm is a dependency
        raise UserError(f"architecture {arch!r} needs timm, which is not installed") from exc
    if not timm.is_model(arch):
        raise UserError(f"unknown architecture {arch!r}; use one of {list(TORCHVISION_RESNETS)} or a timm model name")
    if stem == "cifar":
        raise UserError(f"stem 'cifar' is only defined for torchvision ResNets, not {arch!r}")
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    feature_dim = int(getattr(model, "head_hidden_size", None) or cast(int, model.num_features))
    # torch types Module.__setattr__ as taking tensors or modules; any value is accepted at runtime.
    model.feature_dim = feature_dim  # type: ignore[assignment]
    return model


def backbone_keys(arch: str, stem: str = "imagenet") -> set[str]:
    """The state-dict keys a backbone of this arch has (what strict loading expects)."""
    return set(backbone_shapes(arch, stem))


def backbone_shapes(arch: str, stem: str = "imagenet", meta: Mapping | None = None) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of a backbone of this arch (multi-stream when ``meta`` names streams)
    with its tensor shape, from a model built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = create_multistream(arch, stem, meta) if meta and meta.get("streams") else create_backbone(arch, stem)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


# --- two-stream (CMC) backbones: RGB in, Lab inside, L and ab streams --------------------------------
# sRGB (D65) -> XYZ and the D65 white point, as in scikit-image's rgb2lab.
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_D65_WHITE = (0.95047, 1.0, 1.08883)
# Lab ranges over the sRGB gamut (L 0..100, a -86.2..98.2, b -107.9..94.5) -> centre and half-range.
LAB_CENTRE = (50.0, (98.233 - 86.183) / 2, (94.478 - 107.857) / 2)
LAB_HALF_RANGE = (50.0, (98.233 + 86.183) / 2, (94.478 + 107.857) / 2)
STREAM_CHANNELS = {"l": 1, "ab": 2}


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE Lab (D65, 2-degree observer) of sRGB images ``(N, 3, H, W)`` in ``[0, 1]``.

    sRGB gamma is removed, the linear RGB mapped to XYZ, scaled by the white point, and
    ``f(t) = t^(1/3)`` (or ``7.787 t + 16/116`` below 0.008856) gives ``L = 116 f(Y) - 16``,
    ``a = 500 (f(X) - f(Y))``, ``b = 200 (f(Y) - f(Z))``.
    """
    rgb = rgb.clamp(0, 1)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).clamp_min(1e-12) ** 2.4, rgb / 12.92)
    matrix = torch.tensor(_XYZ_FROM_RGB, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_D65_WHITE, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    xyz = torch.einsum("ij,njhw->nihw", matrix, linear) / white
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def scaled_resnet(arch: str, stem: str, in_channels: int, width: float) -> nn.Module:
    """A torchvision ResNet with every stage ``width`` times as wide and ``in_channels`` inputs.

    State-dict keys are torchvision's (``conv1``, ``bn1``, ``layer1..4``); the classifier is
    ``Identity`` and ``forward`` returns pooled features of size ``feature_dim``.
    """
    from torchvision.models import resnet as tv

    if arch not in RESNETS:
        raise UserError(f"CMC streams are torchvision ResNets {list(RESNETS)}, not {arch!r}")
    if not 0 < width <= 4:
        raise UserError(f"CMC stream width must be in (0, 4], got {width}")
    spec = RESNETS[arch]
    block, layers = (tv.BasicBlock if spec.block == "basic" else tv.Bottleneck), list(spec.layers)
    base = max(8, round(64 * width))

    class ScaledResNet(tv.ResNet):
        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            if planes == 64:  # first stage: the stem's (scaled) output feeds it
                self.inplanes = base
            return super()._make_layer(block, planes * base // 64, blocks, stride, dilate)

    model = ScaledResNet(block, layers)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(in_channels, base, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(in_channels, base, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.bn1 = nn.BatchNorm2d(base)
    model.fc = nn.Identity()
    model.feature_dim = base * 8 * block.expansion
    return model


class TwoStreamBackbone(nn.Module):
    """Normalised RGB -> Lab -> (L encoder, ab encoder) -> concatenated features ``(N, 2 * D)``.

    ``mean``/``std`` undo the input normalisation; they are not part of the state dict (the card
    records them in its meta), so the keys are exactly ``l.<torchvision key>`` and ``ab.<...>``.
    """

    mean: torch.Tensor
    std: torch.Tensor
    lab_centre: torch.Tensor
    lab_scale: torch.Tensor

    def __init__(self, arch: str, stem: str, mean: Sequence[float], std: Sequence[float], width: float = 0.5) -> None:
        super().__init__()
        self.l = scaled_resnet(arch, stem, STREAM_CHANNELS["l"], width)
        self.ab = scaled_resnet(arch, stem, STREAM_CHANNELS["ab"], width)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("lab_centre", torch.tensor(LAB_CENTRE).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("lab_scale", torch.tensor(LAB_HALF_RANGE).view(1, 3, 1, 1), persistent=False)
        self.feature_dim = cast(int, self.l.feature_dim) + cast(int, self.ab.feature_dim)

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The L and ab inputs (each scaled to about [-1, 1]) of normalised RGB images."""
        lab = (rgb_to_lab(x.float() * self.std + self.mean) - self.lab_centre) / self.lab_scale
        return lab[:, :1], lab[:, 1:]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        l_view, ab_view = self.views(x)
        return self.l(l_view), self.ab(ab_view)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.encode(x), dim=1)


def create_two_stream(arch: str, stem: str, meta: Mapping) -> TwoStreamBackbone:
    """The model of a two-stream (CMC) card from its meta (``streams``, ``stream_width``, ``mean``, ``std``)."""
    if list(meta.get("streams", [])) != ["l", "ab"]:
        raise UserError(f"unsupported stream layout {meta.get('streams')!r}; expected ['l', 'ab'] (CMC)")
    return TwoStreamBackbone(arch, stem, meta["mean"], meta["std"], float(meta.get("stream_width", 0.5)))


def create_multistream(arch: str, stem: str, meta: Mapping) -> nn.Module:
    """The model of a multi-stream card (CMC: Lab ``l`` and ``ab`` streams, RGB in, features concatenated)."""
    return create_two_stream(arch, stem, meta)
