"""Detectron2 model parts the transfer protocol needs beyond the stock ones.

* Backbone builders ``build_ringbench_resnet_fpn_backbone`` (FPN) and
  ``build_ringbench_resnet_backbone`` (C4): Detectron2's ResNet, with the stem chosen by
  ``MODEL.RESNETS.STEM_TYPE``. ``"imagenet"`` is Detectron2's ``BasicStem`` (7x7 conv, stride 2,
  max-pool). ``"cifar"`` serves cards pretrained on small images (32-96 px), whose first conv is
  3x3 at stride 1 with no max-pool: here that conv runs as pretrained (stride 1) followed by a 3x3
  max-pool at stride 2, so res2..res5 have strides 2..16 instead of 4..32. Objects of 20-50 px then
  span 10-25 cells at res2, near the scale at which a 32 px classifier saw its objects in layer1.
  (Measured on syn_det, 100 iterations: stride 2 raised box AP over the ImageNet-like stride 4
  from 3.0 to 9.7 for a MoCo-ring card and from 5.9 to 12.2 for random weights, at about twice the
  cost per iteration.) The FPN levels are named by stride (p1..p5), and :func:`feature_names_for_stem` moves the RPN and
  ROI-head inputs down one level to match.
* ``Res5ROIHeadsExtraNorm``: the C4 box head with a norm after res5, as in the MoCo detection
  protocol (the pretrained res5 is followed by a freshly initialised, trained normalisation).
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from fvcore.nn import weight_init

from ringbench.resnets import RESNETS
from transfer.d2.compat import d2

STEM_TYPES = ("imagenet", "cifar")
_REGISTERED: list[bool] = []


def add_ringbench_config(cfg) -> None:
    """Config keys our builders read (added before merging our YAML files)."""
    cfg.MODEL.RESNETS.STEM_TYPE = "imagenet"


CIFAR_STEM_STRIDE = 2


def _cifar_stem_class():
    D2: Any = d2()  # Detectron2's classes exist only at runtime: subclass them as Any

    class CifarStem(D2.modeling.backbone.resnet.BasicStem):
        """3x3 conv at stride 1 (as pretrained) + norm + ReLU + 3x3 max-pool at stride 2."""

        def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "BN"):
            super().__init__(in_channels, out_channels, norm)
            self.stride = CIFAR_STEM_STRIDE
            self.conv1 = D2.layers.Conv2d(
                in_channels,
                out_channels,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=False,
                norm=D2.layers.get_norm(norm, out_channels),
            )
            weight_init.c2_msra_fill(self.conv1)

        def forward(self, x):
            x = F.relu_(self.conv1(x))
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)

    return CifarStem


def _with_stem(cfg, resnet):
    """Swap in the stem ``MODEL.RESNETS.STEM_TYPE`` asks for, with the feature strides updated."""
    stem_type = cfg.MODEL.RESNETS.get("STEM_TYPE", "imagenet")
    if stem_type not in STEM_TYPES:
        raise ValueError(f"MODEL.RESNETS.STEM_TYPE must be one of {STEM_TYPES}, got {stem_type!r}")
    if stem_type == "cifar":
        old = resnet.stem
        resnet.stem = _cifar_stem_class()(old.conv1.in_channels, old.out_channels, cfg.MODEL.RESNETS.NORM)
        factor = old.stride // resnet.stem.stride
        resnet._out_feature_strides = {k: v // factor for k, v in resnet._out_feature_strides.items()}
        if cfg.MODEL.BACKBONE.FREEZE_AT >= 1:  # the replaced stem was frozen by the builder; so is this one
            resnet.stem.freeze()
    return resnet


def feature_names_for_stem(names, stem: str) -> list[str]:
    """FPN level names (``p<log2 stride>``) for a stem: one level lower for the stride-2 CIFAR stem."""
    if stem != "cifar":
        return list(names)
    return [f"p{int(n[1:]) - 1}" if n.startswith("p") and n[1:].isdigit() else n for n in names]


def register() -> None:
    """Register the builders and the head in Detectron2's registries (once per process)."""
    if _REGISTERED:
        return
    D2 = d2()
    backbone = D2.modeling.backbone
    registry = D2.modeling.BACKBONE_REGISTRY

    def build_ringbench_resnet_backbone(cfg, input_shape):
        return _with_stem(cfg, backbone.build_resnet_backbone(cfg, input_shape))

    def build_ringbench_resnet_fpn_backbone(cfg, input_shape):
        # Detectron2's ResNet-FPN, with the FPN built on the (possibly re-stemmed) ResNet's strides.
        fpn = backbone.fpn
        resnet = build_ringbench_resnet_backbone(cfg, input_shape)
        top_block = fpn.LastLevelMaxPool()  # pools the coarsest FPN level, named by its stride
        top_block.in_feature = f"p{int(math.log2(resnet.output_shape()[cfg.MODEL.FPN.IN_FEATURES[-1]].stride))}"
        return fpn.FPN(
            bottom_up=resnet,
            in_features=cfg.MODEL.FPN.IN_FEATURES,
            out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
            norm=cfg.MODEL.FPN.NORM,
            top_block=top_block,
            fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        )

    for fn in (build_ringbench_resnet_backbone, build_ringbench_resnet_fpn_backbone):
        if fn.__name__ not in registry:
            registry.register(fn)

    heads = D2.modeling.ROI_HEADS_REGISTRY
    if "Res5ROIHeadsExtraNorm" not in heads:
        base: Any = D2.modeling.roi_heads.Res5ROIHeads  # a runtime class: subclassed as Any

        class Res5ROIHeadsExtraNorm(base):
            """Res5 box head followed by an extra (trained) norm layer."""

            @classmethod
            def _build_res5_block(cls, cfg):
                seq, out_channels = super()._build_res5_block(cfg)
                norm = D2.layers.get_norm(cfg.MODEL.RESNETS.NORM, out_channels)
                seq.add_module(str(len(seq)), norm)
                return seq, out_channels

        heads.register(Res5ROIHeadsExtraNorm)
    _REGISTERED.append(True)


def build_resnet(arch: str, stem: str = "imagenet", norm: str = "BN"):
    """Detectron2's ResNet (all four stages) for a torchvision arch, with our stem choice."""
    D2 = d2()
    cfg = D2.config.get_cfg()
    add_ringbench_config(cfg)
    spec = RESNETS[arch]
    depth, res2 = spec.depth, spec.res2_out_channels
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = res2
    cfg.MODEL.RESNETS.STEM_TYPE = stem
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    shape = D2.layers.ShapeSpec(channels=3)
    return _with_stem(cfg, D2.modeling.backbone.build_resnet_backbone(cfg, shape))


def check_conversion(arch: str, stem: str, state_dict, source: str = "backbone") -> list[str]:
    """Convert ``state_dict`` and load it into Detectron2's ResNet, every key checked; the keys."""
    from transfer.d2.convert import load_converted, torchvision_to_detectron2

    return load_converted(build_resnet(arch, stem), torchvision_to_detectron2(state_dict), source=source)
