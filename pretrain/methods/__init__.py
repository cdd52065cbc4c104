"""Pretraining methods: ``build_method(cfg, dataset_size, stem)`` picks one by ``cfg["method"]``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pretrain.methods.base import Method
from ringbench.errors import UserError


def method_classes() -> dict[str, type[Method]]:
    from pretrain.methods.cmc import CMC
    from pretrain.methods.ir import InstanceDiscrimination
    from pretrain.methods.moco import MoCo
    from pretrain.methods.random_init import RandomInit
    from pretrain.methods.simclr import SimCLR
    from pretrain.methods.supervised import Supervised

    return {
        "ir": InstanceDiscrimination,
        "moco": MoCo,
        "cmc": CMC,
        "simclr": SimCLR,
        "random": RandomInit,
        "supervised": Supervised,
    }


def build_method(
    cfg: Mapping[str, Any],
    dataset_size: int,
    stem: str,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Method:
    """The method ``cfg["method"]`` for a dataset of ``dataset_size`` images normalised with ``mean``/``std``."""
    classes = method_classes()
    if cfg["method"] not in classes:
        raise UserError(f"unknown method {cfg['method']!r}; available: {sorted(classes)}")
    return classes[cfg["method"]](cfg, dataset_size, stem, mean, std)
