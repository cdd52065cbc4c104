"""Contrastive multiview coding (Tian et al. 2019) on the L and ab views of Lab, plain and ring.

Each image is converted from RGB to CIE Lab *inside the model* (so a user feeds RGB, normalised
with the card's mean/std); a half-width ResNet encodes L (1 channel), another encodes ab
(2 channels). Each stream has a memory bank; the loss is cross-view NCE in both directions:
``z_l`` against the ab bank (its own entry positive, negatives drawn from the bank or, ring
variant, from the ring of the bank ranked by similarity to ``z_l``), and ``z_ab`` against the L bank.
The card holds both streams (keys ``l.*`` and ``ab.*``); frozen-feature transfer concatenates them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.cli import UserError
from pretrain.methods.base import MemoryBank, Method, ProjectionHead

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

    layouts = {
        "resnet18": (tv.BasicBlock, [2, 2, 2, 2]), "resnet34": (tv.BasicBlock, [3, 4, 6, 3]),
        "resnet50": (tv.Bottleneck, [3, 4, 6, 3]), "resnet101": (tv.Bottleneck, [3, 4, 23, 3]),
    }
    if arch not in layouts:
        raise UserError(f"CMC streams are torchvision ResNets {sorted(layouts)}, not {arch!r}")
    if not 0 < width <= 4:
        raise UserError(f"CMC stream width must be in (0, 4], got {width}")
    block, layers = layouts[arch]
    base = max(8, int(round(64 * width)))

    class ScaledResNet(tv.ResNet):
        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):  # noqa: ANN001
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

    def __init__(self, arch: str, stem: str, mean: Sequence[float], std: Sequence[float], width: float = 0.5) -> None:
        super().__init__()
        self.l = scaled_resnet(arch, stem, STREAM_CHANNELS["l"], width)
        self.ab = scaled_resnet(arch, stem, STREAM_CHANNELS["ab"], width)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("lab_centre", torch.tensor(LAB_CENTRE).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("lab_scale", torch.tensor(LAB_HALF_RANGE).view(1, 3, 1, 1), persistent=False)
        self.feature_dim = self.l.feature_dim + self.ab.feature_dim

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


class CMC(Method):
    name = "cmc"
    views = 1

    def __init__(self, cfg, dataset_size: int, stem: str, mean=None, std=None) -> None:
        super().__init__(cfg, dataset_size, stem, mean, std)
        cc = cfg["cmc"]
        self.width = float(cc["width"])
        self.backbone = TwoStreamBackbone(cfg["arch"], stem, self.mean, self.std, self.width)
        self.head_l = ProjectionHead(self.backbone.l.feature_dim, cc["head_dim"], mlp=False)
        self.head_ab = ProjectionHead(self.backbone.ab.feature_dim, cc["head_dim"], mlp=False)
        self.bank_l = MemoryBank(dataset_size, cc["head_dim"], cc["bank_momentum"], seed=self.seed)
        self.bank_ab = MemoryBank(dataset_size, cc["head_dim"], cc["bank_momentum"], seed=self.seed + 1)
        self.num_negatives = min(int(cc["num_negatives"]), dataset_size)

    def ring_pool_size(self, world_size: int = 1) -> int:
        return len(self.bank_l)

    def _cross(self, anchor: torch.Tensor, bank: MemoryBank, index: torch.Tensor) -> torch.Tensor:
        positives = bank.memory[index].detach()
        if self.loss_cfg["name"] == "ring":
            samples = self.loss_cfg["num_samples"] or self.num_negatives
            return self.contrast(anchor, positives, bank.memory.detach(), num_samples=samples)
        return self.contrast(anchor, positives, bank.sample(self.num_negatives, self.generator))

    def training_step(self, views, index):
        feat_l, feat_ab = self.backbone.encode(views[0])
        z_l = F.normalize(self.head_l(feat_l), dim=1)
        z_ab = F.normalize(self.head_ab(feat_ab), dim=1)
        loss_l = self._cross(z_l, self.bank_ab, index)  # L anchors, ab memory
        loss_ab = self._cross(z_ab, self.bank_l, index)  # ab anchors, L memory
        loss = loss_l + loss_ab
        self.bank_l.update(index, z_l.detach())
        self.bank_ab.update(index, z_ab.detach())
        return loss, {"loss": loss.detach().item(), "loss_l": loss_l.detach().item(), "loss_ab": loss_ab.detach().item()}

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=1)

    def card_streams(self) -> dict[str, nn.Module]:
        return {"l": self.backbone.l, "ab": self.backbone.ab}

    def card_meta(self) -> dict:
        return {"stream_width": self.width, "colour_space": "lab", "stream_channels": dict(STREAM_CHANNELS)}
