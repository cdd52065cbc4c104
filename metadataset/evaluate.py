"""Few-shot evaluation on cached features: episodes, probe, accuracy with a 95% confidence interval.

Meta-Dataset reports, per source, the mean query accuracy over 600 test episodes with the 95%
interval ``1.96 * std / sqrt(n)``; the average over sources is the plain mean of the source means.
Episodes depend only on ``(seed, source name)``, so backbones evaluated with the same seed see the
same episodes and their per-episode accuracies can be compared pairwise.
"""

from __future__ import annotations

import itertools
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from metadataset.sampling import ClassStructure, FixedEpisodes, VariableEpisodes, iter_episodes, validate_episodes

EPISODE_CHUNK = 100  # episodes whose features are gathered and solved together


@dataclass
class SourceResult:
    source: str
    accuracies: np.ndarray  # per episode, in [0, 1]
    ways: np.ndarray
    support_sizes: np.ndarray
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def ci95(self) -> float:
        return confidence_interval(self.accuracies)


def confidence_interval(values: Sequence[float] | np.ndarray) -> float:
    """Half-width of the 95% normal interval of the mean: ``1.96 * std / sqrt(n)``."""
    values = np.asarray(values, dtype=np.float64)
    return float(1.96 * values.std() / np.sqrt(len(values))) if len(values) else float("nan")


def episode_seed(seed: int, source: str) -> list[int]:
    """The generator seed of a source's episodes: the same for a source alone or within ``md_all``."""
    return [int(seed), zlib.crc32(source.encode())]


def evaluate_source(
    source: str,
    features: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    probe: Any,
    rules: VariableEpisodes | FixedEpisodes,
    episodes: int = 600,
    seed: int = 0,
    structure: ClassStructure | None = None,
    progress: bool = False,
) -> SourceResult:
    """Sample ``episodes`` episodes over ``(features, labels)`` and score ``probe`` on each.

    Episodes are drawn lazily, ``EPISODE_CHUNK`` at a time (memory does not grow with their
    number), with a progress bar when ``progress``."""
    from tqdm import tqdm

    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=len(class_names))
    validate_episodes(class_names, counts, rules, where=source)
    start = time.perf_counter()
    identity = episode_seed(seed, source)
    drawn = iter_episodes(identity, labels, len(class_names), episodes, rules, structure)
    accuracies: list[float] = []
    ways: list[int] = []
    support_sizes: list[int] = []
    with tqdm(total=episodes, desc=f"episodes {source}", unit="ep", disable=not progress, leave=False) as bar:
        while chunk := list(itertools.islice(drawn, EPISODE_CHUNK)):
            tasks = [(np.asarray(features[e.support]), e.support_labels, np.asarray(features[e.query])) for e in chunk]
            keys = [(*identity, len(accuracies) + i) for i in range(len(chunk))]  # episode i of these episodes
            preds = probe.fit_predict_many(tasks, keys=keys)
            accuracies.extend(float(np.mean(p == e.query_labels)) for p, e in zip(preds, chunk))
            ways.extend(len(np.unique(e.support_labels)) for e in chunk)
            support_sizes.extend(len(e.support) for e in chunk)
            bar.update(len(chunk))
    return SourceResult(
        source=source,
        accuracies=np.asarray(accuracies),
        ways=np.array(ways),
        support_sizes=np.array(support_sizes),
        seconds=time.perf_counter() - start,
    )


def summarise(results: Sequence[SourceResult]) -> tuple[dict[str, float], dict[str, float]]:
    """Metrics and 95% intervals in accuracy points (0-100).

    One source: ``acc``. Several: ``acc_<source>`` each and ``acc_avg``, the mean of the source
    means, whose interval combines the sources' intervals as independent estimates.
    """
    if len(results) == 1:
        r = results[0]
        return {"acc": 100 * r.mean}, {"acc": 100 * r.ci95}
    metrics = {f"acc_{r.source}": 100 * r.mean for r in results}
    ci = {f"acc_{r.source}": 100 * r.ci95 for r in results}
    metrics["acc_avg"] = float(np.mean([100 * r.mean for r in results]))
    ci["acc_avg"] = float(np.sqrt(np.sum([(100 * r.ci95) ** 2 for r in results])) / len(results))
    return metrics, ci


def table_rows(results: Sequence[SourceResult]) -> list[tuple[str, str, int]]:
    """``(source, "mean ± ci", episodes)`` rows plus an average row (for printing)."""
    rows = [(r.source, f"{100 * r.mean:.2f} ± {100 * r.ci95:.2f}", len(r.accuracies)) for r in results]
    if len(results) > 1:
        metrics, ci = summarise(results)
        rows.append(
            ("average", f"{metrics['acc_avg']:.2f} ± {ci['acc_avg']:.2f}", sum(len(r.accuracies) for r in results))
        )
    return rows
