"""VOC2007 classification: the reader on files in the devkit's layout, and the 11-point AP against
a line-by-line transcription of the devkit's VOCevalcls.m."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ringbench.errors import UserError
from transfer.voc07 import (
    VOC_CLASSES,
    allpoint_average_precision,
    read_voc2007_classification,
    voc11_average_precision,
    voc11_mean_average_precision,
)


def write_voc2007(root, splits: dict[str, list[str]], labels: dict[str, np.ndarray]) -> None:
    """The devkit layout: ImageSets/Main/<class>_<split>.txt (' 1' / ' 0' / '-1' as the devkit writes
    them) and JPEGImages/<id>.jpg."""
    main = root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    main.mkdir(parents=True)
    jpegs = root / "VOCdevkit" / "VOC2007" / "JPEGImages"
    jpegs.mkdir()
    for split, ids in splits.items():
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for c, name in enumerate(VOC_CLASSES):
            (main / f"{name}_{split}.txt").write_text(
                "".join(f"{i} {v:2d}\n" for i, v in zip(ids, labels[split][:, c]))
            )
        for i in ids:
            (jpegs / f"{i}.jpg").write_bytes(b"\xff\xd8\xff")


def _devkit_ap(out, gt):
    """VOCevalcls.m, transcribed: sort(-out) (stable), tp = gt > 0, fp = gt < 0 (difficult: neither),
    rec = tp / sum(gt > 0), prec = tp ./ (fp + tp) (0/0 = NaN, which max ignores), t = 0:0.1:1."""
    order = sorted(range(len(out)), key=lambda i: -out[i])
    tp = fp = 0
    rec, prec = [], []
    npos = sum(1 for g in gt if g > 0)
    for i in order:
        tp += gt[i] > 0
        fp += gt[i] < 0
        rec.append(tp / npos)
        prec.append(tp / (tp + fp) if tp + fp else math.nan)
    ts = [0.0, 0.1, 0.2, 3 * 0.1, 0.4, 0.5, 1 - 4 * 0.1, 1 - 3 * 0.1, 1 - 2 * 0.1, 1 - 0.1, 1.0]  # MATLAB's 0:0.1:1
    ap = 0.0
    for t in ts:
        p = [q for r, q in zip(rec, prec) if r >= t and not math.isnan(q)]
        ap += (max(p) if p else 0.0) / 11
    return ap


def test_reader_on_the_devkit_layout(tmp_path):
    rng = np.random.default_rng(0)
    ids = {"trainval": ["000005", "000007", "000009"], "test": ["000001", "000002"]}
    labels = {s: rng.choice([1, 0, -1], size=(len(v), 20)).astype(np.int8) for s, v in ids.items()}
    write_voc2007(tmp_path, ids, labels)
    for split in ("trainval", "test"):
        paths, got = read_voc2007_classification(tmp_path, split)
        assert [p.name for p in paths] == [f"{i}.jpg" for i in ids[split]]
        np.testing.assert_array_equal(got, labels[split])
    # the VOCdevkit folder itself works as the root too
    assert read_voc2007_classification(tmp_path / "VOCdevkit", "test")[0] == paths


def test_reader_errors_name_the_expected_file(tmp_path):
    with pytest.raises(UserError, match=r"expected .*VOCdevkit/VOC2007/ImageSets/Main/ \(the VOC devkit layout"):
        read_voc2007_classification(tmp_path, "test")
    ids = {"test": ["000001", "000002"]}
    write_voc2007(tmp_path, ids, {"test": np.ones((2, 20), dtype=np.int8)})
    main = tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    (main / "sofa_test.txt").unlink()
    with pytest.raises(UserError, match=r"^VOC2007: expected .*/ImageSets/Main/sofa_test.txt \(the VOC devkit"):
        read_voc2007_classification(tmp_path, "test")
    (main / "sofa_test.txt").write_text("000002  1\n000001 -1\n")
    with pytest.raises(UserError, match="lists other images"):
        read_voc2007_classification(tmp_path, "test")
    (main / "sofa_test.txt").write_text("000001  1\n000002  2\n")
    with pytest.raises(UserError, match="line 2"):
        read_voc2007_classification(tmp_path, "test")
    (main / "sofa_test.txt").write_text("000001  1\n000002  0\n")
    (tmp_path / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(UserError, match=r"expected .*JPEGImages/000002.jpg"):
        read_voc2007_classification(tmp_path, "test")


def test_11_point_ap_matches_the_devkit():
    cases = [
        ([0.9, 0.8, 0.7, 0.6], [1, -1, 1, -1]),
        ([0.9, 0.8, 0.7, 0.6, 0.5], [0, 1, -1, 0, 1]),  # difficult first: NaN precision in the devkit
        ([0.5, 0.5, 0.5, 0.1], [-1, 1, 1, -1]),  # ties keep the images' order
        ([float(v) for v in range(10, 0, -1)], [1, 1, 1, -1, -1, -1, -1, 1, 1, 1]),  # recall 3/10 < 0.3
        ([0.1, 0.2], [-1, 1]),
    ]
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(2, 40))
        gt = rng.choice([1, 0, -1], size=n, p=[0.3, 0.1, 0.6])
        gt[0] = 1
        cases.append((np.round(rng.normal(size=n), 1).tolist(), gt.tolist()))  # rounded: ties
    for out, gt in cases:
        assert voc11_average_precision(np.array(out), np.array(gt)) == pytest.approx(_devkit_ap(out, gt), abs=1e-12)
    assert voc11_average_precision(np.array([0.9, 0.1]), np.array([1, -1])) == 1.0
    # 10 positives, 3 of them first, then a negative: recall 3/10 does not reach the devkit's 0.3
    # (0.30000000000000004), so precision 1 counts for t = 0, 0.1, 0.2 only
    labels = np.array([1, 1, 1, -1] + [1] * 7)
    got = voc11_average_precision(np.arange(11, 0, -1.0), labels)
    assert got == pytest.approx((3 + 8 * 10 / 11) / 11)
    with pytest.raises(ValueError, match="positive"):
        voc11_average_precision(np.array([0.1, 0.2]), np.array([-1, 0]))


def test_all_point_ap_and_the_mean():
    out, gt = np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, -1, 1, 0, 1])
    # precision at the three positives 1, 2/3, 3/4; made monotone 1, 3/4, 3/4
    assert allpoint_average_precision(out, gt) == pytest.approx((1 + 0.75 + 0.75) / 3)
    scores = np.stack([out, -out], 1)
    labels = np.stack([gt, gt], 1)
    mean, each = voc11_mean_average_precision(scores, labels)
    assert each == [voc11_average_precision(out, gt), voc11_average_precision(-out, gt)]
    assert mean == pytest.approx(np.mean(each))
