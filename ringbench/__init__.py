"""The layer under ringbench's stages: what pretraining, transfer, the few-shot protocol, the sweep and the
leaderboard all use, and nothing that belongs to one of them.

``errors`` (the user-error type), ``cli`` (one-line errors and exit codes), ``fileio`` (atomic files, hashes,
locks), ``config`` (bounded YAML and structured configs), ``card`` (the backbone card format and the safe
loaders), ``resnets`` and ``backbones`` (the ResNet specs and the architecture factory), ``readers`` (data sets
in torchvision's layouts), ``shapes`` (the embedded synthetic images), ``ring_schedules`` (the ring's
``w_outer`` schedules), ``logreg`` (the batched logistic-regression solver of the probes and the linear tasks),
``stats`` (intervals), ``records`` and ``store`` (the result record and the store), ``published`` (published
numbers). It imports no stage.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("ringbench")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
