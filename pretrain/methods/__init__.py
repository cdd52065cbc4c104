"""Pretraining methods: ``build_method(cfg, dataset_size, stem)`` picks one by ``cfg["method"]``."""

from __future__ import annotations

from typing import Any, Mapping

from pretrain.cli import UserError
from pretrain.methods.base import Method


def method_classes() -> dict[str, type[Method]]:
    from pretrain.methods.ir import InstanceDiscrimination
    from pretrain.methods.moco import MoCo

    return {"ir": InstanceDiscrimination, "moco": MoCo}


def build_method(cfg: Mapping[str, Any], dataset_size: int, stem: str) -> Method:
    classes = method_classes()
    if cfg["method"] not in classes:
        raise UserError(f"unknown method {cfg['method']!r}; available: {sorted(classes)}")
    return classes[cfg["method"]](cfg, dataset_size, stem)
