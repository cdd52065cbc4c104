"""Load any supported checkpoint into a torchvision-keyed backbone, strictly.

``load_backbone(path)`` detects the format, unwraps the backbone with the rules of
:data:`SOURCE_FORMATS` (the one table of prefixes and heads, in the spirit of the ssl-transfer
study's per-source rules), and checks the result against the architecture's keys: a missing
backbone key, or an unexpected key that is not a known head, is an error listing the keys.

Formats: our backbone card; MoCo v1/v2 (``state_dict`` with ``module.encoder_q.``); the
official ring code's PyTorch-Lightning checkpoints (``state_dict`` with ``model.`` and a
projection head, momentum encoder ``model_k.``, queue and memory bank); plain torchvision
ResNet state dicts; timm checkpoints; Detectron2 ``.pkl`` weights.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
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

log = logging.getLogger(__name__)

# Wrappers that training code adds around any model (DataParallel/DDP, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# (block type, blocks per stage) -> architecture: the inverse of ringbench.resnets.RESNETS, which keeps the facts.
_RESNET_LAYOUTS: dict[tuple[str, tuple[int, ...]], str] = {(s.block, s.layers): arch for arch, s in RESNETS.items()}


@dataclass(frozen=True)
class SourceFormat:
    """How one checkpoint family stores its backbone.

    ``prefixes``: the backbone's key prefix, tried in order (``""`` = keys are already bare);
    ``heads``: key patterns (regex, matched at the start of the full key) that are known
    non-backbone parts and may be dropped; ``renames``: ``(old, new)`` substring rules applied
    to backbone keys after the prefix is removed.
    """

    name: str
    prefixes: tuple[str, ...]
    heads: tuple[str, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()


SOURCE_FORMATS: dict[str, SourceFormat] = {
    "card": SourceFormat("card", ("",)),
    "moco": SourceFormat(
        "moco",
        ("encoder_q.",),
        heads=(r"encoder_q\.fc\.", r"encoder_k\.", r"queue$", r"queue_ptr$"),
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
}


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


def load_backbone(path: str | Path, name: str | None = None, arch: str | None = None) -> Backbone:
    """Read ``path`` in any supported format; see the module docstring.

    ``arch`` is needed only for non-ResNet timm checkpoints that do not record it.
    """
    path = Path(path)
    name = path_component(name, "--name") if name else path_component(path.stem, f"{path}: the file's stem")
    raw = load_checkpoint_file(path)
    sha = sha256_file(path)
    if is_card(raw):
        validate_card_dict(raw, source=str(path))
        meta = dict(raw["meta"])
        state = dict(raw["state_dict"])
        expected = _expected_shapes(raw["arch"], raw["stem"], meta, path)
        _check_keys(path, "card", state, set(expected), SOURCE_FORMATS["card"])
        check_tensors(state, str(path), expected)
        return Backbone(
            name=name,
            path=path,
            sha256=sha,
            arch=raw["arch"],
            stem=raw["stem"],
            state_dict=state,
            meta=meta,
            mean=tuple(meta["mean"]),
            std=tuple(meta["std"]),
            source_format="card",
        )
    fmt, state, arch_hint = _detect_format(path, raw)
    rules = SOURCE_FORMATS[fmt]
    backbone_state, dropped = _unwrap(state, rules)
    if fmt == "detectron2":
        from transfer.d2.convert import detectron2_to_torchvision

        backbone_state = detectron2_to_torchvision(backbone_state)
    arch = arch or arch_hint or infer_resnet_arch(backbone_state, path)
    stem = infer_stem(backbone_state)
    expected = _expected_shapes(arch, stem, {}, path)
    backbone_state = _fill_bn_counters(backbone_state, set(expected))
    _check_keys(path, fmt, backbone_state, set(expected), rules, extra_unexpected=dropped["unknown"])
    check_tensors(backbone_state, str(path), expected)
    log.warning("%s: %s checkpoint carries no input normalisation; using ImageNet mean/std", path.name, fmt)
    meta = {
        "method": fmt,
        "source_format": fmt,
        "image_size": None,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "normalisation": "assumed-imagenet",
    }
    return Backbone(
        name=name,
        path=path,
        sha256=sha,
        arch=arch,
        stem=stem,
        state_dict=backbone_state,
        meta=meta,
        source_format=fmt,
        dropped_keys=dropped["heads"],
    )


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


def _detect_format(path: Path, raw: Any) -> tuple[str, dict[str, torch.Tensor], str | None]:
    """-> (format name, cleaned full state dict, arch recorded in the file or None)."""
    if not isinstance(raw, Mapping):
        raise UserError(f"{path}: not a checkpoint dict (found {type(raw).__name__})")
    if raw.get("__detectron2__"):
        return "detectron2", clean_state_dict(raw["state_dict"]), None
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
    if any(k.startswith("encoder_q.") for k in keys):
        return "moco", state, arch_hint
    if "pytorch-lightning_version" in raw or any(k.startswith("model.") for k in keys):
        return "lightning", state, arch_hint
    if any(k.startswith(("stem.", "res2.", "backbone.bottom_up.")) for k in keys):
        return "detectron2", state, None
    if arch_hint and arch_hint not in TORCHVISION_RESNETS:
        return "timm", state, arch_hint
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in keys):
        return "torchvision", state, arch_hint
    raise UserError(
        f"{path}: unrecognised checkpoint layout (first keys: {keys[:5]}); supported: ringbench card, MoCo, "
        f"ring Lightning, torchvision, timm, Detectron2 .pkl"
    )


def _is_timm(arch: str) -> bool:
    try:
        import timm
    except ImportError:  # pragma: no cover
        return False
    return bool(timm.is_model(arch))


def _unwrap(state: Mapping[str, torch.Tensor], rules: SourceFormat) -> tuple[dict, dict[str, list[str]]]:
    """Apply one format's rules: keep the backbone under its prefix, drop known heads."""
    head_patterns = [re.compile(p) for p in rules.heads]
    prefix = next((p for p in rules.prefixes if p and any(k.startswith(p) for k in state)), "")
    backbone: dict[str, torch.Tensor] = {}
    heads, unknown = [], []
    for key, value in state.items():
        if any(p.match(key) for p in head_patterns):
            heads.append(key)
        elif key.startswith(prefix):
            short = key[len(prefix) :]
            for old, new in rules.renames:
                short = short.replace(old, new)
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
