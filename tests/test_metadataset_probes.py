"""Probes against scikit-learn on small problems."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics.pairwise import cosine_similarity
from sklearn.neighbors import KNeighborsClassifier

from metadataset.episode_batch import episode_cost, gram_factor, pad_batch, plan_chunks
from metadataset.probes import CentroidProbe, KNNProbe, LogisticRegressionProbe, make_probe, probe_from_config
from ringbench.errors import UserError
from ringbench.logreg import l2_normalise, logreg_logits, solve_logreg


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """scikit-learn's small fits are many times slower with BLAS threads on a busy machine."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def _episode(rng, ways=5, shots=5, queries=10, dim=32, spread=2.0, shots_per_class=None):
    means = rng.normal(size=(ways, dim))
    shots_per_class = shots_per_class or [shots] * ways
    sx = np.concatenate([means[c] + spread * rng.normal(size=(s, dim)) for c, s in enumerate(shots_per_class)])
    sy = np.repeat(np.arange(ways), shots_per_class)
    qx = np.concatenate([means[c] + spread * rng.normal(size=(queries, dim)) for c in range(ways)])
    qy = np.repeat(np.arange(ways), queries)
    return sx.astype(np.float32), sy, qx.astype(np.float32), qy


def _sklearn_proba(sx, sy, qx, lam):
    clf = LogisticRegression(C=1.0 / (lam * len(sy)), tol=1e-9, max_iter=2000)
    clf.fit(l2_normalise(sx.astype(np.float64)), sy)
    return clf.predict_proba(l2_normalise(qx.astype(np.float64)))


@pytest.mark.parametrize("lam", [1e-3, 0.1])
def test_batched_solver_matches_sklearn_probabilities(lam):
    rng = np.random.default_rng(0)
    # episodes of different ways and shots in one batch (padding of samples and classes)
    episodes = [
        _episode(rng, ways=w, shots_per_class=s)
        for w, s in [(5, [1, 2, 3, 4, 5]), (3, [6, 6, 6]), (7, [2] * 7), (5, [10, 1, 1, 1, 3])]
    ]
    batch = pad_batch([e[:3] for e in episodes], "cpu", torch.float64, project=False)
    lam_t = torch.full((len(episodes), 1), lam, dtype=torch.float64)
    weight, bias = solve_logreg(batch.x, batch.y, batch.valid[:, None].double(), batch.class_mask, lam_t, tol=1e-8)
    logits = logreg_logits(batch.query, weight, bias)[:, :, 0]
    for i, (sx, sy, qx, _) in enumerate(episodes):
        k = int(sy.max()) + 1
        ours = torch.softmax(logits[i, : len(qx), :k], -1).numpy()
        np.testing.assert_allclose(ours, _sklearn_proba(sx, sy, qx, lam), atol=2e-4)


@pytest.mark.parametrize("principal", [True, False])
def test_projection_onto_the_support_span_is_exact(principal):
    rng = np.random.default_rng(1)
    tasks = [_episode(rng, dim=64)[:3] for _ in range(2)] + [_episode(rng, dim=64, shots=3)[:3]]  # padded
    probs = []
    for project in (False, True):
        batch = pad_batch(tasks, "cpu", torch.float64, project=project, principal=principal)
        lam = torch.full((3, 1), 0.01, dtype=torch.float64)
        w, b = solve_logreg(batch.x, batch.y, batch.valid[:, None].double(), batch.class_mask, lam, tol=1e-8)
        probs.append(torch.softmax(logreg_logits(batch.query, w, b)[:, :, 0], -1).numpy())
    assert batch.x.shape[-1] == 25  # solved in 25 coordinates instead of 64
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-5)


def test_preconditioning_does_not_change_the_solution():
    rng = np.random.default_rng(2)
    base = rng.normal(size=32)
    sx, sy, qx, _ = _episode(rng, spread=0.3)
    sx = sx + 6 * base  # nearly collinear features, as from an untrained network
    batch = pad_batch([(sx, sy, qx)], "cpu", torch.float64, project=True)
    lam = torch.tensor([[1e-2]], dtype=torch.float64)
    out = [
        solve_logreg(batch.x, batch.y, batch.valid[:, None].double(), batch.class_mask, lam, tol=1e-8, precondition=p)
        for p in (False, True)
    ]
    probs = [torch.softmax(logreg_logits(batch.query, w, b)[:, :, 0], -1).numpy() for w, b in out]
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-4)


def test_probe_predictions_equal_sklearn_on_many_episodes():
    rng = np.random.default_rng(3)
    episodes = [_episode(rng, spread=4.0) for _ in range(40)]
    probe = LogisticRegressionProbe(weight_decay=0.05)
    preds = probe.fit_predict_many([e[:3] for e in episodes])
    agree = [np.mean(p == np.argmax(_sklearn_proba(*e[:3], 0.05), 1)) for p, e in zip(preds, episodes)]
    assert np.mean(agree) > 0.995
    # arbitrary label values are mapped and returned
    sx, sy, qx, _ = episodes[0]
    np.testing.assert_array_equal(probe.fit_predict(sx, sy * 10 + 3, qx), preds[0] * 10 + 3)


def test_cross_validated_weight_decay_matches_a_sklearn_reference():
    """Per-episode choice: stratified 3-fold accuracy on the support set (ties: log-loss)."""
    rng = np.random.default_rng(4)
    grid = (1e-3, 1e-1, 10.0)
    probe = LogisticRegressionProbe(weight_decay="cv", grid=grid, folds=3, tol=1e-8)
    episodes = [_episode(rng, ways=3, shots=6, spread=s)[:3] for s in np.linspace(1.0, 8.0, 12)]
    batch = pad_batch(episodes, "cpu", torch.float64, project=True)
    chosen = probe._choose_weight_decay(batch)[:, 0].numpy()
    for (sx, sy, _), lam in zip(episodes, chosen):
        rank = np.array([np.sum(sy[:i] == sy[i]) for i in range(len(sy))])
        fold = rank % 3
        scores = []
        for g in grid:
            correct = nll = 0.0
            for f in range(3):
                train, test = fold != f, fold == f
                clf = LogisticRegression(C=1.0 / (g * train.sum()), tol=1e-9, max_iter=2000)
                clf.fit(l2_normalise(sx[train].astype(np.float64)), sy[train])
                proba = clf.predict_proba(l2_normalise(sx[test].astype(np.float64)))
                correct += np.sum(clf.classes_[proba.argmax(1)] == sy[test])
                nll -= np.log(proba[np.arange(test.sum()), sy[test]]).sum()
            scores.append(correct / len(sy) - 1e-6 * nll / len(sy))
        assert lam == grid[int(np.argmax(scores))]


def test_centroid_probe_is_cosine_to_class_means():
    rng = np.random.default_rng(5)
    sx, sy, qx, _ = _episode(rng)
    means = np.stack([l2_normalise(sx)[sy == c].mean(0) for c in range(5)])
    expected = cosine_similarity(qx, means).argmax(1)
    np.testing.assert_array_equal(CentroidProbe().fit_predict(sx, sy, qx), expected)


def test_protonet_probe_is_sklearn_s_nearest_centroid():
    """Snell et al.'s rule: the nearest class mean of the raw features in Euclidean distance (scikit-learn's
    NearestCentroid); it differs from the cosine centroid when the features' norms differ."""
    from sklearn.neighbors import NearestCentroid

    rng = np.random.default_rng(7)
    sx, sy, qx, _ = _episode(rng)
    sx = sx * rng.uniform(0.2, 5.0, (len(sx), 1))  # norms that differ: cosine and Euclidean disagree
    labels = np.array([3, 9, 4, 7, 1])[sy]  # any class ids
    ref = NearestCentroid().fit(sx, labels).predict(qx)
    got = probe_from_config(make_probe("protonet").config()).fit_predict(sx, labels, qx)
    np.testing.assert_array_equal(got, ref)
    assert (CentroidProbe().fit_predict(sx, labels, qx) != got).any()


@pytest.mark.parametrize("k", [1, 3])
def test_knn_probe_matches_sklearn(k):
    rng = np.random.default_rng(6)
    sx, sy, qx, _ = _episode(rng, ways=2, shots=7, spread=3.0)  # two classes, odd k: no ties
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(sx, sy).predict(qx)
    np.testing.assert_array_equal(KNNProbe(k=k).fit_predict(sx, sy, qx), ref)


def test_probe_factory_errors():
    with pytest.raises(UserError, match="unknown probe"):
        make_probe("svm")
    with pytest.raises(UserError, match="weight decay"):
        LogisticRegressionProbe(weight_decay="strong")
    with pytest.raises(UserError, match="k >= 1"):
        KNNProbe(k=0)


def test_fixed_weight_decay_path_equals_projected_solve():
    """A fixed lambda is solved from the raw support Gram matrix and scores the queries in feature space;
    it predicts as the span-coordinate solve of pad_batch does, with padded episodes in the batch."""
    rng = np.random.default_rng(5)
    tasks = [_episode(rng, dim=64, spread=3.0)[:3] for _ in range(20)]
    tasks += [_episode(rng, ways=4, dim=64, shots_per_class=[1, 3, 2, 5], spread=3.0)[:3] for _ in range(5)]
    tasks = [(sx * rng.uniform(0.5, 3.0), sy, qx * rng.uniform(0.5, 3.0)) for sx, sy, qx in tasks]  # any scale
    probe = LogisticRegressionProbe(weight_decay=0.02)
    fixed = probe._solve_chunk_fixed(tasks, torch.float64)
    batch = pad_batch(tasks, "cpu", torch.float64, project=True, principal=False)
    lam = torch.full((len(tasks), 1), 0.02, dtype=torch.float64)
    w, b = solve_logreg(batch.x, batch.y, batch.valid[:, None].double(), batch.class_mask, lam)
    logits = logreg_logits(batch.query, w, b)[:, :, 0].masked_fill(~batch.class_mask[:, None], -1e9)
    for i, (_, _, qx) in enumerate(tasks):
        np.testing.assert_array_equal(fixed[i], logits[i, : len(qx)].argmax(-1).numpy())


def test_episodes_solved_in_chunks_predict_as_one_batch():
    """Episodes of mixed sizes are sorted into chunks (here forced small by the memory bound); the
    predictions return to their episodes' places and equal a single batched solve's."""
    rng = np.random.default_rng(7)
    tasks = [_episode(rng, ways=w, shots=s, queries=q)[:3] for w, s, q in [(5, 5, 10), (3, 2, 7), (4, 6, 5)] * 4]
    one = LogisticRegressionProbe(weight_decay=0.02).fit_predict_many(tasks)
    cost = episode_cost(30, 50, 5, 32, 1)
    chunked = LogisticRegressionProbe(weight_decay=0.02, max_elements=3 * cost).fit_predict_many(tasks)
    for a, b, (_, _, qx) in zip(one, chunked, tasks):
        assert len(a) == len(qx)
        np.testing.assert_array_equal(a, b)


def test_chunk_plan_is_the_greedy_rule():
    """The vectorised plan equals adding sorted episodes one by one while the padded batch fits."""
    rng = np.random.default_rng(8)
    sizes = rng.integers(1, 40, size=(200, 3))
    sizes = sizes[np.lexsort(sizes.T[::-1])]
    limit = 40 * episode_cost(20, 20, 20, 64, 3)
    expected, start = [], 0
    while start < len(sizes):
        stop, peak = start, np.zeros(3, dtype=int)
        while stop < len(sizes):
            grown = np.maximum(peak, sizes[stop])
            if stop > start and (stop + 1 - start) * episode_cost(grown[0], grown[2], grown[1], 64, 3) > limit:
                break
            peak, stop = grown, stop + 1
        expected.append((start, stop))
        start = stop
    assert list(plan_chunks(sizes, 64, 3, limit)) == expected
    assert len(expected) > 3


@pytest.mark.parametrize("indefinite", [False, True])
def test_gram_factor_maps_weights_back_to_the_support(indefinite):
    """``F^T`` and ``v -> F^-T v`` from a Gram matrix: ``F F^T = G``, and ``G F^-T w = F w`` (the support's
    scores under the feature-space weights equal the solver's); the principal axes when no Cholesky factor exists."""
    rng = np.random.default_rng(9)
    a = torch.from_numpy(rng.normal(size=(3, 6, 4)))
    gram = a @ a.transpose(1, 2) + (-1e-3 if indefinite else 0.5) * torch.eye(6, dtype=torch.float64)
    upper, to_span = gram_factor(gram.float(), torch.float64)
    factor = upper.transpose(1, 2)
    evals, evecs = torch.linalg.eigh(gram.float().double())
    positive = evecs @ torch.diag_embed(evals.clamp_min(0)) @ evecs.transpose(1, 2)
    np.testing.assert_allclose(factor @ upper, positive, atol=1e-4)
    assert bool((upper.tril(-1) == 0).all()) != indefinite  # triangular: the Cholesky factor was used
    w = torch.from_numpy(rng.normal(size=(3, 6, 5)))
    if indefinite:  # weights along the kept axes only
        w = upper @ torch.linalg.pinv(upper) @ w
    np.testing.assert_allclose(gram.float().double() @ to_span(w), factor @ w, atol=1e-4)
