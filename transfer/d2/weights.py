"""Model files for ``--eval-only --weights``, read by the suite's safe loaders and handed to Detectron2.

Detectron2's ``DetectionCheckpointer`` reads ``.pkl`` files with plain ``pickle`` (a crafted file
runs code) and ``.pth`` files with ``torch.load``. :func:`safe_checkpointer` keeps its key matching
and conversions but reads every file through :mod:`ringbench.card`: ``.pkl`` through the NumPy-only
unpickler, anything else through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ringbench.card import load_checkpoint_file, load_numpy_pickle
from ringbench.errors import UserError
from ringbench.fileio import atomic_save, atomic_write_text
from transfer.d2.compat import d2


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


def checkpointer_class():
    """Detectron2's ``DetectionCheckpointer`` that writes atomically and reads ``.pth`` files safely.

    A checkpoint is written to a temporary file and renamed (a run killed while saving leaves the
    previous checkpoint whole), as is ``last_checkpoint``; our own ``.pth`` files are read with
    ``torch.load(weights_only=True)``, never unpickled, and a ``.pkl`` given to ``--weights`` by the
    NumPy-only unpickler (:func:`transfer.d2.weights.read_model_file`): Detectron2 never unpickles.
    """
    D2: Any = d2()

    class Checkpointer(D2.checkpoint.DetectionCheckpointer):
        def save(self, name: str, **kwargs: Any) -> None:
            if not self.save_dir or not self.save_to_disk:
                return
            data = {"model": self.model.state_dict()}
            data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
            data.update(kwargs)
            path = Path(self.save_dir) / f"{name}.pth"
            self.logger.info("Saving checkpoint to %s", path)
            atomic_save(data, path)
            self.tag_last_checkpoint(path.name)

        def tag_last_checkpoint(self, last_filename_basename: str) -> None:
            atomic_write_text(Path(self.save_dir) / "last_checkpoint", last_filename_basename)

        _checked: tuple[str, dict[str, Any]] | None = None  # the resume checkpoint, read once

        def _load_file(self, filename: str) -> dict[str, Any]:
            if self._checked is not None and self._checked[0] == filename:
                data, self._checked = self._checked[1], None
                return data
            return read_model_file(filename)  # .pkl: the NumPy-only unpickler; .pth: weights_only

        def get_checkpoint_file(self) -> str:
            """The file ``last_checkpoint`` names, which must be there: Detectron2 would start from scratch
            without a word where it is missing or unreadable."""
            tag = Path(self.save_dir) / "last_checkpoint"
            try:
                name = tag.read_bytes().decode("utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise UserError(f"{tag}: unreadable ({exc}); {FORCE_HINT}") from exc
            path = Path(self.save_dir) / name
            if not name or "/" in name or not path.is_file():
                raise UserError(f"{tag} names {name!r}, which is not a checkpoint file there; {FORCE_HINT}")
            return str(path)

        def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
            if resume and self.has_checkpoint():
                checkpoint = self.get_checkpoint_file()
                data = read_model_file(checkpoint)
                check_resume_weights(self.model, data["model"], checkpoint)
                self._checked = (checkpoint, data)
            return super().resume_or_load(path, resume=resume)

    return Checkpointer


FORCE_HINT = "rerun with --force to train this seed again from the card"


def check_resume_weights(model: Any, weights: Mapping[str, Any], source: str) -> None:
    """A checkpoint to resume from must be this model's: every key, every shape. Detectron2 loads what
    matches and drops the rest with a warning, which would continue training a partly fresh model."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    wrong = sorted(
        f"{k} {tuple(getattr(v, 'shape', ()))} (model {expected[k]})"
        for k, v in weights.items()
        if k in expected and tuple(getattr(v, "shape", ())) != expected[k]
    )
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"wrong shapes {wrong[:3]}"
        count = len(missing) + len(wrong)
        raise UserError(f"{source}: not a checkpoint of this model ({count} keys: {detail}); {FORCE_HINT}")


def safe_checkpointer(model: Any) -> Any:
    """The runs' ``DetectionCheckpointer`` (:func:`checkpointer_class`) for ``model``."""
    return checkpointer_class()(model)
