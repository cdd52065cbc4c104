"""Seeds of the random streams of a pretraining run, derived from the run's seed.

Every stream (augmentations of one process in one epoch, the data order of an epoch, a method's
draws of negatives) gets its own seed from ``numpy.random.SeedSequence([seed, stream, *coords])``,
which hashes the whole tuple: streams never share a seed, for any number of ranks or epochs (an
arithmetic scheme such as ``seed*1000 + epoch*10 + rank`` collides from 10 ranks on).
"""

from __future__ import annotations

import numpy as np

AUGMENT = 0  # (epoch, rank): random augmentations in the main process of one rank
ORDER = 1  # (): the sampler's seed; DistributedSampler shuffles with seed + epoch
METHOD = 2  # (epoch,): a method's own draws (negatives from a memory bank), the same on every rank
WORKERS = 3  # (epoch, rank): the base seed of one rank's data-loader workers (their augmentations)


def stream_seed(seed: int, stream: int, *coords: int) -> int:
    """A 63-bit seed for ``stream`` at ``coords`` (e.g. epoch, rank) of a run seeded with ``seed``."""
    state = np.random.SeedSequence([int(seed), int(stream), *(int(c) for c in coords)]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))
