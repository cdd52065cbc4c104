"""Stage 1 of ringbench: self-supervised pretraining with conditional (ring) and hard negatives.

Produces backbone cards (see :mod:`ringbench.card`) for the transfer stage.
"""
