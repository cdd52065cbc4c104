"""Load any supported checkpoint into a torchvision-keyed backbone, strictly.

``load_backbone(path)`` detects the format, unwraps the backbone with the rules of
:data:`SOURCE_FORMATS` (the one table of prefixes and heads, in the spirit of the ssl-transfer
study's per-source rules), and checks the result against the architecture's keys: a missing
backbone key, or an unexpected key that is not a known head, is an error listing the keys.

Formats (docs/formats.md lists each with the file its layout comes from): our backbone card;
MoCo v1/v2 and PCL (``module.encoder_q.``); the official ring code's PyTorch-Lightning
checkpoints (``model.``); plain torchvision ResNet state dicts; timm checkpoints; Detectron2
``.pkl`` weights; VISSL ``.torch`` (``classy_state_dict`` ... ``trunk``, ``_feature_blocks.``);
solo-learn Lightning ``.ckpt`` and mmselfsup / mmpretrain (``backbone.``); MoCo v3
(``module.base_encoder.``); DINO training checkpoints (``teacher`` / ``student``); SwAV,
DeepCluster-v2, SeLa-v2 (``module.`` with ``projection_head`` and ``prototypes``); InfoMin, InsDis,
PIRL (PyContrast's ``module.encoder.``); BYOL's Haiku pickle; SimCLR v1/v2 in their PyTorch
conversions (no input normalisation).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ringbench.backbones import backbone_shapes, create_backbone
from ringbench.card import IMAGENET_MEAN, IMAGENET_STD, check_tensors, is_card, load_checkpoint_file, validate_card_dict
from ringbench.errors import UserError, preview
from ringbench.fileio import path_component, sha256_file
from ringbench.resnets import RESNETS, TORCHVISION_RESNETS
from transfer.foreign import (
    WRAPPER_PREFIXES,
    byol_ignored,
    byol_key,
    clean_state_dict,
    convert_tensor,
    detect_format,
    simclr_v2_key,
)

log = logging.getLogger(__name__)

# (block type, blocks per stage) -> architecture: the inverse of ringbench.resnets.RESNETS, which keeps the facts.
_RESNET_LAYOUTS: dict[tuple[str, tuple[int, ...]], str] = {(s.block, s.layers): arch for arch, s in RESNETS.items()}


@dataclass(frozen=True)
class SourceFormat:
    """How one checkpoint family stores its backbone.

    ``prefixes``: the backbone's key prefix, tried in order (``""`` = keys are already bare);
    ``heads``: key patterns (regex, matched at the start of the full key) that are known
    non-backbone parts and may be dropped; ``renames``: ``(old, new)`` substring rules applied
    to backbone keys after the prefix is removed; ``key_map``: for layouts that are not
    torchvision's, a function from a backbone key to its torchvision key (``None``: not a
    backbone key); ``mean`` / ``std``: the input normalisation the project trained with, where
    the file does not carry it (``None``: ImageNet's, assumed with a warning); ``source``: the
    project's file the layout is read from (docs/formats.md cites it).
    """

    name: str
    prefixes: tuple[str, ...]
    heads: tuple[str, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()
    key_map: Callable[[str], str | None] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    source: str = ""


# SimCLR v1 and v2 were trained on pixels in [0, 1] with no normalisation (tonylins/simclr-converter
# README: "without normalization, as the original TF models were not trained with normalization").
_ZEROS, _ONES = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

SOURCE_FORMATS: dict[str, SourceFormat] = {
    "card": SourceFormat("card", ("",)),
    # MoCo v1/v2 (facebookresearch/moco moco/builder.py) and PCL v1/v2 (salesforce/PCL pcl/builder.py):
    # the same MoCo wrapper; encoder_q.fc is the projection (an MLP for v2).
    "moco": SourceFormat(
        "moco",
        ("encoder_q.",),
        heads=(r"encoder_q\.fc\.", r"encoder_k\.", r"queue$", r"queue_ptr$"),
        source="facebookresearch/moco moco/builder.py; salesforce/PCL pcl/builder.py",
    ),
    "lightning": SourceFormat(
        "lightning",
        ("model.",),
        heads=(
            r"model\.fc\.",
            r"model\.linear\.",
            r"model_k\.",
            r"moco_queue",
            r"memory_bank",
            r"_memory",
            r"model\.projection",
            r"model\.head\.",
        ),
        renames=((".shortcut.", ".downsample."),),
    ),
    "torchvision": SourceFormat("torchvision", ("",), heads=(r"fc\.",)),
    "timm": SourceFormat("timm", ("",), heads=(r"fc\.", r"head\.", r"classifier\.")),
    # Whole-model prefixes (FPN trunk, C4 trunk and its res5 in roi_heads) are mapped by
    # transfer.d2.convert.detectron2_to_torchvision, the inverse of the Detectron2 conversion.
    "detectron2": SourceFormat(
        "detectron2",
        ("",),
        heads=(
            r"backbone\.fpn_",
            r"backbone\.top_block",
            r"proposal_generator\.",
            r"roi_heads\.(?!res5\.)",
            r"pixel_mean$",
            r"pixel_std$",
            r"fc1000\.",
        ),
    ),
    # classy_state_dict -> base_model -> model -> trunk (heads are a sibling dict, dropped whole)
    "vissl": SourceFormat(
        "vissl",
        ("_feature_blocks.",),
        source="facebookresearch/vissl extra_scripts/convert_vissl_to_torchvision.py, vissl/models/trunks/resnext.py",
    ),
    "solo-learn": SourceFormat(
        "solo-learn",
        ("backbone.",),
        heads=(
            r"projector\.",
            r"predictor\.",
            r"classifier\.",
            r"momentum_backbone\.",
            r"momentum_projector\.",
            r"momentum_classifier\.",
            r"momentum_head\.",
            r"head\.",
            r"prototypes",
            r"queue",
            r"dino_loss_func\.",
        ),
        source="vturrisi/solo-learn solo/methods/base.py (backbone, classifier, momentum_*), solo/methods/*.py",
    ),
    "mmselfsup": SourceFormat(
        "mmselfsup",
        ("backbone.",),
        heads=(
            r"neck\.",
            r"head\.",
            r"momentum_encoder\.",
            r"target_net\.",
            r"encoder_k\.",
            r"queue$",
            r"queue_ptr$",
            r"data_preprocessor\.",
        ),
        source="open-mmlab/mmselfsup mmselfsup/models/algorithms/base.py, moco.py; mmpretrain ImageClassifier",
    ),
    "mocov3": SourceFormat(
        "mocov3",
        ("base_encoder.",),
        heads=(r"base_encoder\.fc\.", r"momentum_encoder\.", r"predictor\."),
        source="facebookresearch/moco-v3 moco/builder.py, main_lincls.py",
    ),
    # teacher (default) or student of MultiCropWrapper(backbone, head); torchvision ResNet with fc = Identity
    "dino": SourceFormat(
        "dino",
        ("backbone.",),
        heads=(r"head\.",),
        source="facebookresearch/dino main_dino.py (save_dict: student, teacher), utils.py, vision_transformer.py",
    ),
    # SwAV, DeepCluster-v2 and SeLa-v2 share src/resnet50.py: projection_head and prototypes (or
    # MultiPrototypes' prototypes.prototypesK) after the trunk
    "swav": SourceFormat(
        "swav",
        ("",),
        heads=(r"projection_head\.", r"prototypes\.", r"fc\."),
        source="facebookresearch/swav src/resnet50.py, main_swav.py, main_deepclusterv2.py",
    ),
    # InfoMin, InsDis, PIRL: RGBSingleHead / RGBMultiHeads (encoder, head, head_jig) under "model"
    "pycontrast": SourceFormat(
        "pycontrast",
        ("encoder.",),
        heads=(r"head\.", r"head_jig\.", r"encoder\.fc\."),
        source="HobbitLong/PyContrast pycontrast/networks/build_backbone.py, pycontrast/learning/base_trainer.py",
    ),
    # The published Haiku pickle's online network; projector, predictor and classifier dropped
    "byol": SourceFormat(
        "byol",
        ("",),
        heads=(r"projector/", r"predictor/", r"classifier/"),
        key_map=byol_key,
        source="google-deepmind/deepmind-research byol/utils/networks.py, byol/utils/checkpointing.py",
    ),
    # Separius/SimCLRv2-Pytorch convert.py output: {"resnet": ..., "head": ...} (head dropped whole)
    "simclr-v2": SourceFormat(
        "simclr-v2",
        ("",),
        heads=(r"fc\.",),
        key_map=simclr_v2_key,
        source="Separius/SimCLRv2-Pytorch resnet.py, convert.py",
        mean=_ZEROS,
        std=_ONES,
    ),
    # tonylins/simclr-converter convert.py output: {"state_dict": torchvision keys with fc}; the keys
    # are torchvision's, so this format is chosen by name (a zoo entry, or --from simclr-v1)
    "simclr-v1": SourceFormat(
        "simclr-v1",
        ("",),
        heads=(r"fc\.",),
        source="tonylins/simclr-converter convert.py, resnet_wider.py",
        mean=_ZEROS,
        std=_ONES,
    ),
}

# Formats that are never recognised from keys alone (they look like another): chosen by name.
BY_NAME_ONLY = ("simclr-v1",)


@dataclass
class Backbone:
    """A loaded backbone: torchvision-keyed weights, architecture and input normalisation."""

    name: str
    path: Path
    sha256: str
    arch: str
    stem: str
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source_format: str = "card"
    dropped_keys: list[str] = field(default_factory=list)

    @property
    def streams(self) -> tuple[str, ...]:
        return tuple(self.meta.get("streams", ()))

    @property
    def image_size(self) -> int | None:
        size = self.meta.get("image_size")
        return int(size) if size else None

    @property
    def default_image_size(self) -> int:
        """The card's image size, else the stem's usual one (32 px for CIFAR stems, 224 otherwise)."""
        return self.image_size or (32 if self.stem == "cifar" else 224)

    def build_model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The feature extractor with these weights (eval mode): ``(N, 3, H, W)`` -> ``(N, D)``.

        Multi-stream cards (CMC) are built by ``ringbench.backbones.create_multistream`` and
        return the streams' features concatenated.
        """
        if self.streams:
            from ringbench.backbones import create_multistream

            model = create_multistream(self.arch, self.stem, self.meta)
        else:
            model = create_backbone(self.arch, self.stem)
        model.load_state_dict(self.state_dict, strict=True)
        return model.to(device).eval()


def load_backbone(
    path: str | Path,
    name: str | None = None,
    arch: str | None = None,
    source_format: str | None = None,
    dino_key: str = "teacher",
    meta: Mapping[str, Any] | None = None,
) -> Backbone:
    """Read ``path`` in any supported format; see the module docstring.

    ``path`` may be ``zoo:NAME``: the zoo entry's fetched file, read with the entry's format and
    normalisation (``transfer.zoo``). ``arch`` is needed only for non-ResNet timm checkpoints that
    do not record it; ``source_format`` names the format instead of detecting it (needed for
    ``simclr-v1``, whose keys are torchvision's); ``dino_key`` picks DINO's ``teacher`` or
    ``student``; ``meta`` adds to a foreign checkpoint's meta (a zoo entry's method and name).
    """
    if str(path).startswith("zoo:"):
        from transfer.zoo import zoo_backbone_args

        zoo_name = str(path)[len("zoo:") :]
        path, zoo_kwargs = zoo_backbone_args(zoo_name)
        return load_backbone(path, name=name or path_component(zoo_name, "zoo name"), arch=arch, **zoo_kwargs)
    path = Path(path)
    if source_format is not None and source_format not in SOURCE_FORMATS:
        raise UserError(f"unknown checkpoint format {source_format!r}; known: {sorted(SOURCE_FORMATS)}")
    raw = load_checkpoint_file(path)
    return backbone_from_checkpoint(
        raw, path, sha256_file(path), name, arch, source_format=source_format, dino_key=dino_key, meta=meta
    )


def backbone_from_checkpoint(
    raw: Any,
    path: Path,
    sha: str,
    name: str | None = None,
    arch: str | None = None,
    source_format: str | None = None,
    dino_key: str = "teacher",
    meta: Mapping[str, Any] | None = None,
) -> Backbone:
    """:func:`load_backbone` on a checkpoint already read (``raw``: what ``load_checkpoint_file`` returns)."""
    name = path_component(name, "--name") if name else path_component(path.stem, f"{path}: the file's stem")
    if is_card(raw):
        validate_card_dict(raw, source=str(path))
        card_meta = dict(raw["meta"])
        state = dict(raw["state_dict"])
        expected = _expected_shapes(raw["arch"], raw["stem"], card_meta, path)
        _check_keys(path, "card", state, set(expected), SOURCE_FORMATS["card"])
        check_tensors(state, str(path), expected, finite=False)  # validate_card_dict checked the values
        return Backbone(
            name=name,
            path=path,
            sha256=sha,
            arch=raw["arch"],
            stem=raw["stem"],
            state_dict=state,
            meta=card_meta,
            mean=tuple(card_meta["mean"]),
            std=tuple(card_meta["std"]),
            source_format="card",
        )
    detectable = [f for f in SOURCE_FORMATS if f not in BY_NAME_ONLY]
    fmt, state, arch_hint, containers_dropped = detect_format(path, raw, detectable, dino_key)
    if source_format is not None and source_format != fmt:
        asked = SOURCE_FORMATS[source_format]
        # a bare torchvision layout is also what a format without a prefix holds once its heads are gone
        if not (fmt == "torchvision" and asked.prefixes == ("",) and asked.key_map is None):
            raise UserError(f"{path}: the file's layout is {fmt!r}, not the {source_format!r} asked for")
        fmt = source_format
    rules = SOURCE_FORMATS[fmt]
    backbone_state, dropped = _unwrap(state, rules, fmt)
    if fmt == "detectron2":
        from transfer.d2.convert import detectron2_to_torchvision

        backbone_state = detectron2_to_torchvision(backbone_state)
    arch = arch or arch_hint or infer_resnet_arch(backbone_state, path)
    stem = infer_stem(backbone_state)
    expected = _expected_shapes(arch, stem, {}, path)
    backbone_state = _fill_bn_counters(backbone_state, set(expected))
    _check_keys(path, fmt, backbone_state, set(expected), rules, extra_unexpected=dropped["unknown"])
    check_tensors(backbone_state, str(path), expected)
    extra = dict(meta or {})
    carried = raw.get("ringbench_meta")  # a card's meta, kept by ringbench-convert in Detectron2 / VISSL files
    if isinstance(carried, Mapping) and isinstance(carried.get("meta"), Mapping):
        extra = {**carried["meta"], **extra}
    mean = tuple(extra.pop("mean", None) or rules.mean or IMAGENET_MEAN)
    std = tuple(extra.pop("std", None) or rules.std or IMAGENET_STD)
    known = "mean" in (meta or {}) or rules.mean is not None
    if isinstance(carried, Mapping) and isinstance(carried.get("meta"), Mapping):
        backbone_meta = dict(extra, mean=list(mean), std=list(std))
        dropped_keys = containers_dropped + dropped["heads"]
        return Backbone(name, path, sha, arch, stem, backbone_state, backbone_meta, mean, std, fmt, dropped_keys)
    if not known:
        log.warning("%s: %s checkpoint carries no input normalisation; using ImageNet mean/std", path.name, fmt)
    backbone_meta = {
        "method": fmt,
        "source_format": fmt,
        "image_size": None,
        "mean": list(mean),
        "std": list(std),
        "normalisation": "source-format" if known else "assumed-imagenet",
    }
    backbone_meta.update(extra)
    return Backbone(
        name=name,
        path=path,
        sha256=sha,
        arch=arch,
        stem=stem,
        state_dict=backbone_state,
        meta=backbone_meta,
        mean=mean,
        std=std,
        source_format=fmt,
        dropped_keys=containers_dropped + dropped["heads"],
    )


def _unwrap(state: Mapping[str, torch.Tensor], rules: SourceFormat, fmt: str = "") -> tuple[dict, dict[str, list[str]]]:
    """Apply one format's rules: keep the backbone under its prefix, drop known heads, map foreign keys."""
    head_patterns = [re.compile(p) for p in rules.heads]
    prefix = next((p for p in rules.prefixes if p and any(k.startswith(p) for k in state)), "")
    backbone: dict[str, torch.Tensor] = {}
    heads: list[str] = []
    unknown: list[str] = []
    for key, value in state.items():
        if any(p.match(key) for p in head_patterns):
            heads.append(key)
        elif key.startswith(prefix):
            short = key[len(prefix) :]
            for old, new in rules.renames:
                short = short.replace(old, new)
            if rules.key_map is not None:
                mapped = rules.key_map(short)
                if mapped is None:
                    (heads if fmt == "byol" and byol_ignored(short) else unknown).append(key)
                    continue
                value = convert_tensor(fmt, short, value)
                short = mapped
            backbone[short] = value
        else:
            unknown.append(key)
    return backbone, {"heads": heads, "unknown": unknown}


def infer_resnet_arch(state: Mapping[str, torch.Tensor], path: Path) -> str:
    """The torchvision ResNet whose blocks per stage and block type (``conv3``: bottleneck) ``state`` has."""
    blocks = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(len(ids))
    kind = "bottleneck" if any(".conv3." in k for k in state) else "basic"
    arch = _RESNET_LAYOUTS.get((kind, tuple(blocks)))
    if arch is None:
        raise UserError(
            f"{path}: cannot tell the architecture ({kind} blocks per stage {blocks}); supported ResNets: "
            f"{list(TORCHVISION_RESNETS)}. For another timm model pass --arch NAME"
        )
    return arch


def infer_stem(state: Mapping[str, torch.Tensor]) -> str:
    """``cifar`` for a 3x3 first convolution (small-image ResNets), ``imagenet`` for 7x7."""
    conv1 = state.get("conv1.weight")
    return "cifar" if conv1 is not None and conv1.ndim == 4 and conv1.shape[-1] == 3 else "imagenet"


def _expected_shapes(arch: str, stem: str, meta: Mapping[str, Any], path: Path) -> dict[str, tuple[int, ...]]:
    """The architecture's keys and tensor shapes (multi-stream cards: their streams' model)."""
    try:
        return backbone_shapes(arch, stem, meta)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from exc
    except (KeyError, TypeError, ValueError) as exc:  # a multi-stream card's meta the model cannot use
        raise UserError(f"{path}: cannot build the card's {arch} ({type(exc).__name__}: {exc})") from exc


def _fill_bn_counters(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Old checkpoints lack BN ``num_batches_tracked``; it is a counter, not a weight: add zeros."""
    for key in expected - state.keys():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.long)
    return state


def _check_keys(
    path: Path,
    fmt: str,
    state: Mapping[str, torch.Tensor],
    expected: set[str],
    rules: SourceFormat,
    extra_unexpected: list[str] | None = None,
) -> None:
    if not expected:
        return
    missing = sorted(expected - state.keys())
    unexpected = sorted((state.keys() - expected) | set(extra_unexpected or ()))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} backbone keys {preview(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys that are not a known head {preview(unexpected)}")
        raise UserError(f"{path}: {fmt} checkpoint does not match the backbone: " + "; ".join(parts))


__all__ = ["SOURCE_FORMATS", "WRAPPER_PREFIXES", "Backbone", "SourceFormat", "clean_state_dict", "load_backbone"]
