"""The layer under ringbench's three stages: what pretraining, transfer and the few-shot protocol
all use, and nothing that belongs to one of them.

``errors`` (the user-error type), ``cli`` (one-line errors and exit codes), ``fileio`` (atomic files
and hashes), ``config`` (YAML and structured configs), ``card`` (the backbone card format),
``resnets`` (the ResNet specs), ``shapes`` (the embedded synthetic images), ``logreg`` (the batched
logistic-regression solver of the few-shot probes and the linear tasks). It imports no stage.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("ringbench")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
