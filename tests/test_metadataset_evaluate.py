"""Few-shot evaluation: confidence intervals, per-source and average rows, paired episodes."""

from __future__ import annotations

import numpy as np
import pytest

from metadataset.evaluate import (
    SourceResult,
    confidence_interval,
    episode_seed,
    evaluate_source,
    summarise,
    table_rows,
)
from metadataset.probes import CentroidProbe
from metadataset.sampling import FixedEpisodes, VariableEpisodes, sample_episodes
from ringbench.errors import UserError


def _result(source, accs):
    accs = np.asarray(accs, dtype=float)
    return SourceResult(source, accs, ways=np.full(len(accs), 5), support_sizes=np.full(len(accs), 25))


def test_confidence_interval_formula():
    accs = np.array([0.2, 0.4, 0.4, 0.6, 0.9])
    assert confidence_interval(accs) == pytest.approx(1.96 * np.std(accs) / np.sqrt(5))


def test_single_source_and_average_rows():
    a, b = _result("omniglot", [0.9, 0.8, 1.0, 0.7]), _result("dtd", [0.5, 0.6])
    metrics, ci = summarise([a])
    assert metrics == {"acc": pytest.approx(85.0)} and ci["acc"] == pytest.approx(100 * a.ci95)
    metrics, ci = summarise([a, b])
    assert metrics["acc_omniglot"] == pytest.approx(85.0) and metrics["acc_dtd"] == pytest.approx(55.0)
    assert metrics["acc_avg"] == pytest.approx(70.0)  # mean of the source means, not of all episodes
    assert ci["acc_avg"] == pytest.approx(np.hypot(100 * a.ci95, 100 * b.ci95) / 2)
    rows = table_rows([a, b])
    assert [r[0] for r in rows] == ["omniglot", "dtd", "average"] and rows[-1][2] == 6


def test_episodes_are_paired_across_backbones_and_tasks():
    """Episodes depend on (seed, source) only: two backbones (different features) see the same
    images, and a source gets the same episodes alone (md_omniglot) or within md_all."""
    labels = np.repeat(np.arange(12), 30)
    first = sample_episodes(episode_seed(0, "omniglot"), labels, 12, 20, VariableEpisodes())
    again = sample_episodes(episode_seed(0, "omniglot"), labels, 12, 20, VariableEpisodes())
    other = sample_episodes(episode_seed(0, "dtd"), labels, 12, 20, VariableEpisodes())
    assert all(np.array_equal(x.query, y.query) for x, y in zip(first, again))
    assert not all(len(x.query) == len(z.query) and np.array_equal(x.query, z.query) for x, z in zip(first, other))


def test_evaluate_source_scores_a_probe_per_episode():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 25)
    means = rng.normal(size=(6, 16)) * 3
    easy = (means[labels] + rng.normal(size=(150, 16))).astype(np.float32)
    noise = rng.normal(size=(150, 16)).astype(np.float32)
    names = [str(c) for c in range(6)]
    good = evaluate_source("s", easy, labels, names, CentroidProbe(), FixedEpisodes(5, 5, 15), episodes=30)
    bad = evaluate_source("s", noise, labels, names, CentroidProbe(), FixedEpisodes(5, 5, 15), episodes=30)
    assert len(good.accuracies) == 30 and (good.ways == 5).all() and (good.support_sizes == 25).all()
    assert good.mean > 0.9 and 0.05 < bad.mean < 0.4  # chance is 0.2
    with pytest.raises(UserError, match="every class needs at least 2 images"):
        evaluate_source("s", easy[:126], labels[:126], names, CentroidProbe(), FixedEpisodes(), episodes=1)
