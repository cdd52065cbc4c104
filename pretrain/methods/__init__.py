"""Pretraining methods, one module each, registered with ``@register_method`` (see :mod:`.registry`)."""

from pretrain.methods.base import Method
from pretrain.methods.registry import build_method, get_method, method_classes, register_method

__all__ = ["Method", "build_method", "get_method", "method_classes", "register_method"]
