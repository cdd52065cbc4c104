"""The ResNet specs, one table for every stage: torchvision's layout and Detectron2's names.

``layers`` are the residual blocks per stage (He et al., 2016, Table 1); ``feature_dim`` is the
pooled output width (512 x block expansion); ``res2_out_channels`` is Detectron2's
``MODEL.RESNETS.RES2_OUT_CHANNELS`` (64 for basic blocks, 256 for bottlenecks), ``depth`` its
``MODEL.RESNETS.DEPTH``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ResNetSpec:
    depth: int
    block: str  # "basic" (ResNet-18/34) | "bottleneck" (ResNet-50 and deeper)
    layers: tuple[int, int, int, int]

    @property
    def expansion(self) -> int:
        return 1 if self.block == "basic" else 4

    @property
    def feature_dim(self) -> int:
        return 512 * self.expansion

    @property
    def res2_out_channels(self) -> int:
        return 64 * self.expansion


RESNETS: dict[str, ResNetSpec] = {
    "resnet18": ResNetSpec(18, "basic", (2, 2, 2, 2)),
    "resnet34": ResNetSpec(34, "basic", (3, 4, 6, 3)),
    "resnet50": ResNetSpec(50, "bottleneck", (3, 4, 6, 3)),
    "resnet101": ResNetSpec(101, "bottleneck", (3, 4, 23, 3)),
    "resnet152": ResNetSpec(152, "bottleneck", (3, 8, 36, 3)),
}
TORCHVISION_RESNETS = tuple(RESNETS)
