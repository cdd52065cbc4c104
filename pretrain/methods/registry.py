"""The method registry (timm's ``register_model`` style): the one list of pretraining methods.

A method registers itself with ``@register_method`` on its class, in its own module of
``pretrain/methods/``; every such module is imported on the first question to the registry, so
adding a method is one file (its class, its config section, the losses it accepts) plus its YAML
recipe. The config schema and validation (:mod:`pretrain.config`) and the trainer read the registry;
nothing else lists methods.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ringbench.errors import UserError

if TYPE_CHECKING:
    from pretrain.methods.base import Method

M = TypeVar("M", bound="type[Method]")

_REGISTRY: dict[str, type[Method]] = {}
_NOT_METHODS = frozenset({"base", "registry"})  # the modules of pretrain/methods/ that hold no method
_discovered = False


def register_method(cls: M) -> M:
    """Class decorator: add ``cls`` to the registry under ``cls.name``."""
    name = cls.name
    if not name or not cls.accepted_losses:
        raise TypeError(f"{cls.__qualname__}: a registered method sets `name` and `accepted_losses`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise TypeError(f"method {name!r} is registered twice ({_REGISTRY[name].__qualname__}, {cls.__qualname__})")
    _REGISTRY[name] = cls
    return cls


def _discover() -> None:
    """Import every method module once (each registers its class on import)."""
    global _discovered
    if _discovered:
        return
    package = importlib.import_module("pretrain.methods")
    for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
        if module not in _NOT_METHODS and not module.startswith("_"):
            importlib.import_module(f"pretrain.methods.{module}")
    _discovered = True


def method_classes() -> dict[str, type[Method]]:
    """Every registered method by name, sorted by name."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def method_names() -> tuple[str, ...]:
    return tuple(method_classes())


def get_method(name: str) -> type[Method]:
    """The class registered as ``name``; a :class:`UserError` listing the others if there is none."""
    classes = method_classes()
    if name not in classes:
        raise UserError(f"unknown method {name!r}; available: {sorted(classes)}")
    return classes[name]


def loss_names() -> tuple[str, ...]:
    """Every loss some method accepts (sorted)."""
    return tuple(sorted({loss for cls in method_classes().values() for loss in cls.accepted_losses}))


def config_sections() -> dict[str, type]:
    """Method name -> the dataclass of its config section (``cfg[name]``), for methods that have one."""
    return {name: cls.config_section for name, cls in method_classes().items() if cls.config_section is not None}


def build_method(
    cfg: Mapping[str, Any],
    dataset_size: int,
    stem: str,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Method:
    """The method ``cfg["method"]`` for a dataset of ``dataset_size`` images normalised with ``mean``/``std``."""
    return get_method(cfg["method"])(cfg, dataset_size, stem, mean, std)
