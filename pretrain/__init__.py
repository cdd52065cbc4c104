"""Stage 1 of ringbench: self-supervised pretraining with conditional (ring) and hard negatives.

Produces backbone cards (see :mod:`pretrain.checkpoint`) for the transfer stage.
"""

__version__ = "0.1.0"
