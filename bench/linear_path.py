"""Kornblith et al. 2019's linear path: ours against ssl-transfer's scikit-learn loop, on the same features.

    python bench/linear_path.py [--train 10000] [--dim 512] [--classes 100] [--rounds 1] [--device cpu]

Features of CIFAR-100's shape scaled to one CPU machine (default 10,000 train images x 512 dimensions,
100 classes; 2,000 test images): non-negative like a ResNet's pooled features, drawn around per-class
means. 20% of train (stratified, seed 0) is the validation split. Both contenders run the whole protocol:
45 values of ``1 / C`` log-spaced over [1e-6, 1e5], each fitted on train and scored on validation (top-1),
then the best refitted on train + validation and scored on test.

* ours: ``transfer.kornblith_protocol.kornblith_evaluation`` (the batched L-BFGS of ``ringbench.logreg``, strongest
  regularisation first with warm starts, features rotated to their principal axes, float32);
* scikit-learn as ``linusericsson/ssl-transfer``'s ``linear.py`` does it: one
  ``LogisticRegression(solver="lbfgs", warm_start=True)`` (its defaults otherwise: ``max_iter=100``,
  ``tol=1e-4``, convergence warnings ignored) refitted with ``C = 1 / value`` for the values in ascending
  order, the first best kept (strict ``>``), then refitted with that ``C`` on train + validation.

Targets: >= 10x faster, the same chosen value or one neighbour on the path, test accuracy within 0.2 points.
The two alternate over ``--rounds`` rounds (``bench/interleave.py``); medians are compared. Ratios are
measured in this one run and printed, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run by path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from ringbench.cli import add_common_flags, run_main


def features(train: int, test: int, dim: int, classes: int, separation: float, flip: float = 0.2, seed: int = 0):
    """``(x, y)`` of train and of test: ``max(0, mean_y + z)``, ``mean_y ~ separation * N(0, I)`` and ``z``
    anisotropic Gaussian noise (a random rotation of standard deviations ``2 (i + 1)^-0.5``): correlated
    coordinates with a few dominant directions, as a network's pooled features have, so that the nearest
    class mean is not already the best classifier; a share ``flip`` of the labels replaced by random ones (the
    ambiguous images of a real data set), so that the weakest regularisation overfits and the best value lies
    inside the path."""
    rng = np.random.default_rng(seed)
    means = separation * rng.normal(size=(classes, dim))
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    mixing = (2.0 * np.arange(1, dim + 1) ** -0.5)[:, None] * rotation

    def draw(n: int):
        y = np.arange(n) % classes
        x = np.maximum(means[y] + rng.normal(size=(n, dim)) @ mixing, 0).astype(np.float32)
        return x, np.where(rng.random(n) < flip, rng.integers(0, classes, n), y)

    return draw(train), draw(test)


def ssl_transfer(train, val, test, path) -> dict:
    """ssl-transfer's ``LinearTester.validate`` + ``evaluate`` with ``metric='accuracy'``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(solver="lbfgs", warm_start=True)
    curve, best, best_score = {}, None, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for value in sorted(path):
            clf.set_params(C=1.0 / value)
            clf.fit(*train)
            curve[value] = clf.score(*val)
            if curve[value] > best_score:
                best_score, best = curve[value], value
        assert best is not None
        clf.set_params(C=1.0 / best)
        clf.fit(np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]))
    return {"value": best, "test": clf.score(*test), "val_curve": curve}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/linear_path.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--train", type=int, default=10000, help="train images (20%% of them validation)")
    parser.add_argument("--test", type=int, default=2000, help="test images")
    parser.add_argument("--dim", type=int, default=512, help="feature dimensions")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--flip", type=float, default=0.2, help="share of labels replaced by random ones")
    parser.add_argument("--separation", type=float, default=0.04, help="scale of the class means (difficulty)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (scikit-learn's takes minutes)")
    parser.add_argument("--device", default="cpu", help="where our solver runs (cpu, cuda)")
    add_common_flags(parser)
    args = parser.parse_args(argv)

    import torch

    from bench.interleave import interleaved, machine_line
    from transfer.kornblith_protocol import KORNBLITH_PATH, kornblith_evaluation
    from transfer.linear import stratified_holdout

    (x, y), test = features(args.train, args.test, args.dim, args.classes, args.separation, args.flip)
    held = stratified_holdout(y, 0.2, 0)
    train, val = (x[~held], y[~held]), (x[held], y[held])
    path = list(KORNBLITH_PATH)
    print(
        f"features {len(y)} x {args.dim}, {args.classes} classes ({len(train[1])} train, {len(val[1])} validation, "
        f"{len(test[1])} test); {len(path)} values of 1/C over [1e-6, 1e5]; torch threads {torch.get_num_threads()}"
    )

    results: dict[str, dict] = {}

    def ours() -> None:
        results["ours"] = kornblith_evaluation(train, val, test, args.classes, "top1", path, args.device)

    def sklearn() -> None:
        results["sklearn"] = ssl_transfer(train, val, test, path)

    medians = interleaved({"ours": ours, "sklearn": sklearn}, args.rounds, warmup=0)
    ours_s, sk_s = medians["ours"], medians["sklearn"]
    mine, theirs = results["ours"], results["sklearn"]
    steps = abs(path.index(mine["value"]) - path.index(theirs["value"]))
    print(f"\nthe whole path with refit, median of {args.rounds} interleaved round(s)")
    print(
        f"   ours (batched L-BFGS, warm starts)    {ours_s:8.2f} s   1/C {mine['value']:<10.4g} "
        f"test accuracy {100 * mine['test']:6.2f}%"
    )
    print(
        f"   scikit-learn (ssl-transfer's loop)    {sk_s:8.2f} s   1/C {theirs['value']:<10.4g} "
        f"test accuracy {100 * theirs['test']:6.2f}%"
    )
    print(
        f"   -> {sk_s / ours_s:.1f}x faster (target >= 10x); chosen values {steps} step(s) apart on the path "
        f"(target <= 1); test accuracy difference {100 * (mine['test'] - theirs['test']):+.2f} points "
        f"(target within 0.2)"
    )
    ours_curve = np.array(list(mine["val_curve"].values()))
    sk_curve = np.array([theirs["val_curve"][v] for v in sorted(path)])
    print(
        f"   validation curves: largest difference {100 * np.abs(ours_curve - sk_curve).max():.2f} points "
        f"(scikit-learn's 100 iterations stop short at the weakest regularisation)"
    )
    print(f"   path {mine['path_seconds']:.2f} s + refit {mine['refit_seconds']:.2f} s (ours, last round)")
    print(f"   {machine_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
