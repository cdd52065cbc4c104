"""The one place that imports Detectron2.

``d2()`` imports Detectron2 and returns a namespace of the submodules the suite uses
(``d2().engine.DefaultTrainer``, ``d2().evaluation.COCOEvaluator``, ...). Where Detectron2 was
installed without its compiled ops (``python -m transfer.d2.install`` on a machine with no CUDA
toolchain), two stand-ins are applied first, and only then:

* ``detectron2._C``: a module whose every function raises :class:`MissingCompiledOp` naming the
  op. Only rotated boxes, deformable convolution and the fast COCO evaluator call it; the suite
  uses none of them (``COCOEvaluator(use_fast_impl=False)``, see :func:`has_compiled_ops`).
* ``PIL.Image.LINEAR = PIL.Image.BILINEAR``: the alias Detectron2 v0.6 uses, removed in Pillow 10.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from functools import lru_cache
from typing import TypedDict

from ringbench.errors import UserError

INSTALL_HINT = "run `make setup` or `python -m transfer.d2.install`"
_SUBMODULES = (
    "checkpoint",
    "config",
    "data",
    "data.datasets",
    "data.transforms",
    "engine",
    "evaluation",
    "layers",
    "modeling",
    "modeling.backbone",
    "model_zoo",
    "solver",
    "structures",
    "utils.comm",
    "utils.env",
    "utils.events",
    "utils.logger",
)


class _State(TypedDict):
    compiled_ops: bool | None  # None until the stand-ins were applied
    stand_ins: list[str]


_STATE: _State = {"compiled_ops": None, "stand_ins": []}


class MissingCompiledOp(RuntimeError):
    """A Detectron2 operation that needs the compiled extension, which this install lacks."""


class _CompiledOpsStandIn(types.ModuleType):
    """``detectron2._C`` for installs without the extension: any op raises a clear error."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise MissingCompiledOp(
                f"Detectron2 op '{name}' needs Detectron2's compiled extension (detectron2._C), which this "
                f"install does not have (a Python-only install). Avoid rotated boxes, deformable convolution "
                f"and COCOEvaluator(use_fast_impl=True), or build Detectron2 from source with a C++/CUDA toolchain"
            )

        missing.__name__ = name
        return missing


def is_installed() -> bool:
    return importlib.util.find_spec("detectron2") is not None


def _apply_stand_ins() -> None:
    if _STATE["compiled_ops"] is not None:
        return
    if not is_installed():
        raise UserError(f"Detectron2 is not installed; {INSTALL_HINT}")
    import detectron2

    try:
        importlib.import_module("detectron2._C")
        _STATE["compiled_ops"] = True
    except ImportError:
        stand_in = _CompiledOpsStandIn("detectron2._C", "stand-in for Detectron2's missing compiled ops")
        sys.modules["detectron2._C"] = stand_in
        detectron2._C = stand_in
        _STATE["compiled_ops"] = False
        _STATE["stand_ins"].append("detectron2._C")
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        # A deliberate patch of the module; Pillow sets BILINEAR with setattr, out of mypy's sight.
        Image.LINEAR = Image.BILINEAR  # type: ignore[attr-defined]
        _STATE["stand_ins"].append("PIL.Image.LINEAR")


@lru_cache(maxsize=1)
def d2() -> types.SimpleNamespace:
    """Import Detectron2 (with stand-ins where needed); its submodules as attributes.

    Raises :class:`UserError` with the install command if Detectron2 is absent.
    """
    _apply_stand_ins()
    import detectron2

    ns = types.SimpleNamespace(version=detectron2.__version__)
    with warnings.catch_warnings():
        # Detectron2 v0.6 on a current torch/setuptools: torch.jit.script and pkg_resources notices
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*pkg_resources.*")
        for name in _SUBMODULES:
            importlib.import_module(f"detectron2.{name}")  # binds e.g. detectron2.utils.comm
    for name in _SUBMODULES:
        top = name.split(".")[0]
        setattr(ns, top, getattr(detectron2, top))
    return ns


def has_compiled_ops() -> bool:
    """True when Detectron2's compiled extension is importable (the real build)."""
    _apply_stand_ins()
    return bool(_STATE["compiled_ops"])


def stand_ins() -> list[str]:
    """Which stand-ins were applied (empty with a full Detectron2 and an old Pillow)."""
    _apply_stand_ins()
    return list(_STATE["stand_ins"])


def engine_versions() -> dict[str, str]:
    """Versions recorded with every Detectron2 result: every record's (``ringbench.store``) plus Detectron2's."""
    from ringbench.records import engine_versions_now

    return {
        **engine_versions_now(),
        "detectron2": d2().version,
        "detectron2_compiled_ops": str(has_compiled_ops()).lower(),
    }
