"""Model files for ``--eval-only --weights``, read by the suite's safe loaders and handed to Detectron2.

Detectron2's ``DetectionCheckpointer`` reads ``.pkl`` files with plain ``pickle`` (a crafted file
runs code) and ``.pth`` files with ``torch.load``. :func:`safe_checkpointer` keeps its key matching
and conversions but reads every file through :mod:`ringbench.card`: ``.pkl`` through the NumPy-only
unpickler, anything else through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ringbench.card import load_checkpoint_file, load_numpy_pickle
from ringbench.errors import UserError


def read_model_file(path: str) -> dict[str, Any]:
    """A model file as Detectron2's checkpointer expects it from ``_load_file``: ``{"model": weights, ...}``.

    ``.pkl``: Detectron2 model-zoo files (``{"model": ..., "__author__": ...}``) as they are; other
    pickles are Caffe2/Detectron1 weights (under ``"blobs"`` for detection models), marked for
    Detectron2's name-matching heuristics, their ``_momentum`` entries left out.
    """
    if str(path).endswith(".pkl"):
        data = load_numpy_pickle(path)
        if not isinstance(data, Mapping):
            raise UserError(f"{path}: a Detectron2 .pkl must hold a dict of weights, got {type(data).__name__}")
        if "model" in data and "__author__" in data:
            return dict(data)
        blobs = data.get("blobs", data)
        if not isinstance(blobs, Mapping):
            raise UserError(f"{path}: 'blobs' is not a dict of weights")
        weights = {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")}
        return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}
    data = load_checkpoint_file(path)
    if not isinstance(data, Mapping):
        raise UserError(f"{path}: not a model checkpoint (found {type(data).__name__})")
    return dict(data) if "model" in data else {"model": dict(data)}


def safe_checkpointer(model: Any) -> Any:
    """The runs' ``DetectionCheckpointer`` for ``model`` (:func:`transfer.d2.train.checkpointer_class`),
    which reads files with :func:`read_model_file`."""
    from transfer.d2.train import checkpointer_class

    return checkpointer_class()(model)
