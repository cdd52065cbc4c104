"""Few-shot probe speed: the batched logistic-regression probe against scikit-learn, and the feature cache.

    python bench/fewshot.py [--backbone card.pth] [--source synthetic|digits] [--episodes 600]

1. A first few-shot evaluation (features extracted by the network, then episodes) against a second
   one of the same backbone (features read back from the cache).
2. On the same 600 5-way 5-shot 15-query episodes of those cached 512-d features: our probe (all
   episodes in one batched L-BFGS solve, PyTorch) against ``sklearn.linear_model.LogisticRegression``
   fitted episode by episode with the same objective (``C = 1 / (lambda * n_support)``) and one BLAS
   thread (its fastest setting for problems this small). Target: >= 30x faster, accuracy within
   0.3 points. The two alternate over ``--rounds`` rounds (``bench/interleave.py``); medians are compared.

Ratios are measured in this one run and printed, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run by path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from ringbench.cli import add_common_flags, run_main


def _evaluate(backbone, source: str, cache: Path, probe, rules, episodes: int, device: str = "cpu"):
    from metadataset.evaluate import evaluate_source
    from metadataset.features import cached_features
    from metadataset.sources import open_source

    start = time.perf_counter()
    feats = cached_features(
        backbone, open_source(source, image_size=backbone.default_image_size), cache, device=device, progress=False
    )
    result = evaluate_source(source, feats.features, feats.labels, feats.class_names, probe, rules, episodes)
    return time.perf_counter() - start, feats, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/fewshot.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--backbone", type=Path, help="backbone card (default: a random ResNet-18, 32 px)")
    parser.add_argument("--source", default="synthetic", choices=["synthetic", "digits"])
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--weight-decay", type=float, default=0.01, help="lambda of both probes")
    parser.add_argument("--cache-dir", type=Path, help="feature cache (default: a fresh temporary folder)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the probe comparison")
    parser.add_argument("--device", default="cpu", help="where the network and our probe run (cpu, cuda)")
    add_common_flags(parser)
    args = parser.parse_args(argv)

    import torch
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from bench.common import random_card
    from bench.interleave import interleaved, machine_line
    from metadataset.probes import LogisticRegressionProbe
    from metadataset.sampling import FixedEpisodes, sample_episodes
    from ringbench.logreg import l2_normalise
    from transfer.checkpoints import load_backbone

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        card = args.backbone or random_card(tmp)
        backbone = load_backbone(card)
        cache = args.cache_dir or tmp / "cache"
        rules = FixedEpisodes(5, 5, 15)
        probe = LogisticRegressionProbe(weight_decay=args.weight_decay, device=args.device)
        print(
            f"backbone {backbone.name} ({backbone.arch}, {backbone.default_image_size} px), source {args.source}, "
            f"{args.episodes} episodes 5-way 5-shot 15-query; torch threads {torch.get_num_threads()}"
        )

        first_s, feats, first = _evaluate(backbone, args.source, cache, probe, rules, args.episodes, args.device)
        second_s, again, second = _evaluate(backbone, args.source, cache, probe, rules, args.episodes, args.device)
        assert again.from_cache and np.array_equal(first.accuracies, second.accuracies)
        print(f"\n1. feature cache ({feats.features.shape[0]} images, {feats.features.shape[1]}-d)")
        cached = " (features were already in --cache-dir: no network run)" if feats.from_cache else ""
        print(f"   first evaluation (network + episodes) {first_s:8.2f} s{cached}")
        print(f"   second evaluation (cache + episodes)  {second_s:8.2f} s   -> {first_s / second_s:.1f}x faster")

        features = np.asarray(again.features)
        eps = sample_episodes([0, 1], again.labels, again.num_classes, args.episodes, rules)
        tasks = [(features[e.support], e.support_labels, features[e.query]) for e in eps]
        probe.fit_predict_many(tasks[:4])  # warm-up (first-call overheads of torch)

        def scikit_learn() -> list[np.ndarray]:
            predictions = []
            with threadpool_limits(1):
                for sx, sy, qx in tasks:
                    clf = LogisticRegression(C=1.0 / (args.weight_decay * len(sy)), max_iter=1000)
                    predictions.append(clf.fit(l2_normalise(sx), sy).predict(l2_normalise(qx)))
            return predictions

        ours, theirs = probe.fit_predict_many(tasks), scikit_learn()
        medians = interleaved({"ours": lambda: probe.fit_predict_many(tasks), "sklearn": scikit_learn}, args.rounds)
        ours_s, sk_s = medians["ours"], medians["sklearn"]
        acc_ours = 100 * np.mean([np.mean(p == e.query_labels) for p, e in zip(ours, eps)])
        acc_sk = 100 * np.mean([np.mean(p == e.query_labels) for p, e in zip(theirs, eps)])
        agree = 100 * np.mean([np.mean(a == b) for a, b in zip(ours, theirs)])
        cv = LogisticRegressionProbe(weight_decay="cv", device=args.device)
        start = time.perf_counter()
        acc_cv = 100 * np.mean([np.mean(p == e.query_labels) for p, e in zip(cv.fit_predict_many(tasks), eps)])
        cv_s = time.perf_counter() - start

        print(
            f"\n2. logistic regression, lambda = {args.weight_decay:g}, {args.episodes} episodes, "
            f"median of {args.rounds} interleaved rounds"
        )
        print(f"   ours, batched (PyTorch L-BFGS)         {ours_s:8.2f} s   accuracy {acc_ours:6.2f}%")
        print(f"   scikit-learn, one fit per episode      {sk_s:8.2f} s   accuracy {acc_sk:6.2f}%")
        print(
            f"   -> {sk_s / ours_s:.1f}x faster (target >= 30x); accuracy difference {acc_ours - acc_sk:+.2f} points "
            f"(target within 0.3); predictions agree on {agree:.2f}% of queries"
        )
        print(
            f"   ours with lambda by {cv.folds}-fold CV over {len(cv.grid)} values: {cv_s:.2f} s, "
            f"accuracy {acc_cv:.2f}%"
        )
        print(f"   {machine_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
