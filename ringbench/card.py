"""The backbone card: the one file between pretraining and transfer.

A ``torch.save``d dict, loadable with ``torch.load(..., weights_only=True)``::

    {"format": "ringbench-backbone/1",
     "arch": "resnet18" | "resnet50" | <timm model name>,
     "stem": "imagenet" | "cifar",
     "state_dict": {torchvision ResNet keys, no fc},
     "meta": {"method", "loss", "loss_params", "dataset", "epochs", "image_size",
              "mean", "std", "seed", "config", "code_version", "created", ...}}

The card carries its own input normalisation so transfer never guesses it. Two-stream
cards (CMC) set ``meta["streams"]`` to the stream names and prefix state-dict keys with
``"<stream>."``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ringbench import __version__
from ringbench.errors import UserError
from ringbench.fileio import atomic_save

FORMAT_NAME = "ringbench-backbone"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"

STEMS = ("imagenet", "cifar")
REQUIRED_META = ("method", "loss", "dataset", "image_size", "mean", "std")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class BackboneCard:
    """In-memory form of a card. ``state_dict`` uses torchvision ResNet keys (no ``fc``)."""

    arch: str
    state_dict: dict[str, torch.Tensor]
    stem: str = "imagenet"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.meta.get("mean", IMAGENET_MEAN))

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.meta.get("std", IMAGENET_STD))

    @property
    def streams(self) -> tuple[str, ...]:
        """Stream names of a multi-stream card (CMC: ``("l", "ab")``); empty for one stream."""
        return tuple(self.meta.get("streams", ()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "arch": self.arch,
            "stem": self.stem,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.state_dict.items()},
            "meta": _plain(self.meta),
        }


def make_meta(**fields: Any) -> dict[str, Any]:
    """Card metadata with ``code_version`` and ``created`` filled in."""
    meta = {"code_version": __version__, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    meta.update(fields)
    return meta


def save_card(card: BackboneCard, path: str | os.PathLike) -> Path:
    """Validate and atomically write ``card`` to ``path``."""
    data = card.to_dict()
    validate_card_dict(data, source=str(path))
    atomic_save(data, path)
    return Path(path)


def load_card(path: str | os.PathLike) -> BackboneCard:
    """Read and validate a card; any problem is a :class:`UserError` naming the file."""
    data = load_checkpoint_file(path)
    if not is_card(data):
        raise UserError(f"{path}: not a ringbench backbone card (no 'format': '{FORMAT_NAME}/N' entry)")
    validate_card_dict(data, source=str(path))
    return BackboneCard(
        arch=data["arch"], stem=data["stem"], state_dict=dict(data["state_dict"]), meta=dict(data["meta"])
    )


def is_card(data: Any) -> bool:
    return isinstance(data, Mapping) and str(data.get("format", "")).startswith(FORMAT_NAME + "/")


def validate_card_dict(data: Mapping[str, Any], source: str = "card") -> None:
    """Check a card dict against the format; raise :class:`UserError` with what is wrong."""
    fmt = str(data.get("format", ""))
    name, _, version = fmt.partition("/")
    if name != FORMAT_NAME or not version.isdigit():
        raise UserError(f"{source}: unknown card format {fmt!r} (expected {FORMAT!r})")
    if int(version) > FORMAT_VERSION:
        raise UserError(f"{source}: card format {fmt!r} is newer than this code reads ({FORMAT!r}); upgrade ringbench")
    arch = data.get("arch")
    if not isinstance(arch, str) or not arch:
        raise UserError(f"{source}: card has no architecture ('arch')")
    if data.get("stem") not in STEMS:
        raise UserError(f"{source}: card stem {data.get('stem')!r} is not one of {list(STEMS)}")
    state = data.get("state_dict")
    if not isinstance(state, Mapping) or not state:
        raise UserError(f"{source}: card has an empty or missing 'state_dict'")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{source}: state_dict entries are not tensors: {bad[:5]}")
    check_tensors(state, source)
    heads = [k for k in state if k.split(".")[0] == "fc" or ".fc." in k]
    if heads:
        raise UserError(f"{source}: a card holds the backbone only, found classifier keys {heads[:5]}")
    meta = data.get("meta")
    if not isinstance(meta, Mapping):
        raise UserError(f"{source}: card has no 'meta' dict")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise UserError(f"{source}: card meta is missing {missing}")
    for key in ("mean", "std"):
        values = meta[key]
        if (
            not isinstance(values, (list, tuple))
            or len(values) != 3
            or not all(_is_number(v) and math.isfinite(v) for v in values)
        ):
            raise UserError(f"{source}: card meta {key!r} must be 3 finite numbers, got {values!r}")
    if any(s <= 0 for s in meta["std"]):
        raise UserError(f"{source}: card meta 'std' must be positive, got {meta['std']!r}")
    size = meta["image_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"{source}: card meta 'image_size' must be a positive integer, got {size!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True`` and clear errors for every way a file can be bad.

    This is the one place the suite reads a checkpoint file from disk: nothing in a file can run
    code (``.pkl`` files go through :func:`load_numpy_pickle`).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a checkpoint file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file, not a checkpoint")
    if path.suffix == ".pkl":
        return _load_detectron2_pickle(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            # argparse.Namespace: the training flags that DINO, PyContrast and MoCo checkpoints keep
            # beside the weights (an attribute bag; building one runs nothing from the file)
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        detail = _unpickler_detail(text)
        if re.search(r"unsupported global|GLOBAL|global .* is not allowed", text, re.IGNORECASE):
            raise UserError(
                f"{path}: refused by torch.load(weights_only=True): it holds Python objects, not just "
                f"tensors ({detail}). Re-save its state_dict, or convert it with a trusted script"
            ) from exc
        raise UserError(f"{path}: not a PyTorch checkpoint ({detail})") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError) as exc:
        # torch.load reports damaged files through many exception types; none is the user's bug.
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(f"{path}: truncated or not a PyTorch checkpoint ({msg})") from exc


def _unpickler_detail(text: str) -> str:
    """The informative line of torch's weights-only refusal (its wording changes between releases:
    ``WeightsUnpickler error: Unsupported global: ...`` up to 2.5, ``Trying to load unsupported
    GLOBAL posix.system whose module posix is blocked.`` in 2.14), without the boilerplate."""
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"global", line, re.IGNORECASE) and not line.startswith("Check the documentation"):
            return line.split("WeightsUnpickler error:", 1)[-1].strip()[:160]
    tail = text.split("WeightsUnpickler error:", 1)
    if len(tail) == 2 and tail[1].strip():
        return " ".join(tail[1].split()).split(" Check the documentation")[0][:160]
    return (lines[0] if lines else "unreadable")[:160]


def check_tensors(
    state: Mapping[str, Any], source: str, shapes: Mapping[str, tuple[int, ...]] | None = None, finite: bool = True
) -> None:
    """The weights themselves: every floating tensor finite (unless ``finite=False``: already checked), and
    (given the architecture's ``shapes``) every shared key of the right shape. One :class:`UserError` listing
    what is wrong."""
    if shapes:
        wrong = [
            f"{k} {tuple(v.shape)} (expected {tuple(shapes[k])})"
            for k, v in state.items()
            if k in shapes and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(shapes[k])
        ]
        if wrong:
            raise UserError(
                f"{source}: {len(wrong)} tensors have the wrong shape for the architecture: {'; '.join(wrong[:3])}"
                + ("; ..." if len(wrong) > 3 else "")
            )
    if not finite:
        return
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not _all_finite(v)]
    if bad:
        raise UserError(f"{source}: {len(bad)} tensors hold NaN or infinite values: {bad[:5]}")


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite. A finite sum proves it in one pass without a mask the size of
    the tensor (any NaN or infinity makes the sum NaN or infinite); only a sum that overflows looks element
    by element."""
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


class NumpyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and NumPy arrays, and refuses every other global:
    for the pickled formats the suite reads (Detectron2 ``.pkl`` weights, CIFAR batches).

    With ``stand_ins=True`` it also reads BYOL's published Haiku checkpoint: the NamedTuples of its
    experiment (``byol.*``, ``optax.*``) become plain tuples and Haiku's immutable mappings plain
    dicts. Stand-ins are inert containers: nothing named in the file is imported or called.
    """

    _allowed: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("collections", "OrderedDict"),
        }
    )

    def __init__(self, *args: Any, stand_ins: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stand_ins = stand_ins

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        if self._stand_ins and name.isidentifier():
            if module.split(".")[0] == "haiku" and name in ("FlatMapping", "FlatMap", "frozendict"):
                return HaikuMapping
            if module.split(".")[0] in ("byol", "optax"):
                return _record_type(module, name)
            if (module, name) == ("_codecs", "encode"):  # how protocol 2 stores bytes (NumPy's array data)
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data or weights pickle")


class HaikuMapping(dict):
    """Stand-in for Haiku's immutable mappings in a pickle: a plain dict of what they held."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        for arg in args:
            if isinstance(arg, (Mapping, list, tuple)):
                self.update(arg)
        self.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, Mapping):
            for value in state.values():
                if isinstance(value, Mapping):
                    self.update(value)


class PickledRecord(tuple):
    """Stand-in for a NamedTuple in a pickle (BYOL's experiment state): its values, in order."""

    pickled_name: ClassVar[str] = ""

    def __new__(cls, *args: Any) -> PickledRecord:
        return tuple.__new__(cls, args)

    def __setstate__(self, state: Any) -> None:
        pass


def _record_type(module: str, name: str) -> type[PickledRecord]:
    return type(name, (PickledRecord,), {"pickled_name": f"{module}.{name}"})


def load_numpy_pickle(path: str | os.PathLike, what: str = "Detectron2 weights pickle", stand_ins: bool = False) -> Any:
    """A pickle of dicts, lists, numbers, strings and NumPy arrays (Detectron2 ``.pkl`` weights,
    CIFAR batches) through :class:`NumpyUnpickler`: any other global is refused, so nothing in
    the file runs. Every problem is a :class:`UserError` naming the file."""
    try:
        with open(path, "rb") as handle:
            return NumpyUnpickler(handle, encoding="latin1", stand_ins=stand_ins).load()
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError, TypeError, IndexError) as exc:
        raise UserError(f"{path}: not a {what} ({' '.join(str(exc).split())[:160]})") from exc


def _load_detectron2_pickle(path: Path) -> Any:
    """``.pkl`` weights: Detectron2's dict of numpy arrays (sometimes under ``"model"``), or BYOL's
    Haiku checkpoint (``experiment_state``: the online network's parameters and state, flattened
    to ``"<module>/<name>"`` keys, returned as ``{"__byol__": True, "state_dict": ...}``)."""
    data = load_numpy_pickle(path, what="weights pickle (Detectron2 or BYOL)", stand_ins=True)
    if isinstance(data, Mapping) and "experiment_state" in data:
        return _byol_state(path, data["experiment_state"])
    carried = data.get("ringbench_meta") if isinstance(data, Mapping) else None
    if isinstance(data, Mapping) and "model" in data and isinstance(data["model"], Mapping):
        data = data["model"]
    if not isinstance(data, Mapping):
        raise UserError(f"{path}: Detectron2 pickle does not hold a dict of weights")
    return {"__detectron2__": True, "state_dict": _tensors(data), "ringbench_meta": carried}


# The fields of BYOL's ``_ByolExperimentState`` (byol/byol_experiment.py), in their order.
BYOL_STATE_FIELDS = ("online_params", "target_params", "online_state", "target_state", "opt_state")


def _byol_state(path: Path, state: Any) -> dict[str, Any]:
    if isinstance(state, tuple) and len(state) == len(BYOL_STATE_FIELDS):
        state = dict(zip(BYOL_STATE_FIELDS, state, strict=True))
    if not isinstance(state, Mapping) or not all(
        isinstance(state.get(k), Mapping) for k in ("online_params", "online_state")
    ):
        raise UserError(f"{path}: BYOL checkpoint has no online_params / online_state mappings")
    flat: dict[str, Any] = {}
    for field_name in ("online_params", "online_state"):
        for module, values in state[field_name].items():
            if not isinstance(values, Mapping):
                raise UserError(f"{path}: BYOL {field_name}[{module!r}] is not a mapping of arrays")
            for name, value in values.items():
                flat[f"{module}/{name}"] = value
    dropped = [k for k in BYOL_STATE_FIELDS if k not in ("online_params", "online_state")]
    return {"__byol__": True, "state_dict": _tensors(flat), "dropped": dropped}


def _tensors(data: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    import numpy as np

    out = {}
    for key, value in data.items():
        if isinstance(value, np.ndarray):
            # not np.ascontiguousarray: it turns a 0-d array (a BN counter) into shape (1,)
            out[str(key)] = torch.from_numpy(value if value.flags.c_contiguous else value.copy(order="C"))
        elif isinstance(value, torch.Tensor):
            out[str(key)] = value
    return out


def _plain(value: Any) -> Any:
    """Meta as plain Python (lists, dicts, str, numbers) so ``weights_only`` loading accepts it."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return str(value)
