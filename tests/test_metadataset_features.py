"""Feature extraction and the on-disk feature cache: reuse, invalidation, corrupt images."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from metadataset import features as feature_cache
from metadataset.features import cache_folder, cache_key, cached_features, preprocess
from metadataset.sources import digits_source, limit_per_class, open_source
from tests.helpers import write_card
from tests.test_metadataset_sources import image_bytes
from transfer.checkpoints import Backbone, load_backbone


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cards")
    return [load_backbone(write_card(folder / f"b{seed}.pth", seed=seed, image_size=16)) for seed in (0, 1)]


@pytest.fixture
def small_digits():
    return limit_per_class(digits_source(), 6)


def test_features_are_the_models_output_on_normalised_resized_images(backbones, small_digits, tmp_path):
    bb = backbones[0]
    fs = cached_features(bb, small_digits, tmp_path, progress=False)
    assert fs.features.shape == (60, 512) and not fs.from_cache
    np.testing.assert_array_equal(fs.labels, np.repeat(np.arange(10), 6))
    model = bb.build_model()
    mean, std = torch.tensor(bb.mean), torch.tensor(bb.std)
    images = [load() for _, _, load in small_digits.items()][:4]
    with torch.no_grad():
        expected = model(torch.stack([preprocess(im, 16, mean, std) for im in images])).numpy()
    np.testing.assert_allclose(fs.features[:4], expected, rtol=1e-4, atol=1e-5)


def test_preprocess_resizes_and_normalises():
    from PIL import Image

    image = Image.new("RGB", (8, 5), (51, 102, 204))
    out = preprocess(image, 16, torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.25, 0.25, 0.25]))
    assert out.shape == (3, 16, 16)
    np.testing.assert_allclose(
        out[:, 3, 7].numpy(), [(0.2 - 0.5) / 0.25, (0.4 - 0.4) / 0.25, (0.8 - 0.3) / 0.25], atol=1e-6
    )


def test_second_evaluation_reads_the_cache(backbones, small_digits, tmp_path, monkeypatch):
    first = cached_features(backbones[0], small_digits, tmp_path, progress=False)
    monkeypatch.setattr(Backbone, "build_model", lambda *a, **k: pytest.fail("the network ran again"))
    second = cached_features(backbones[0], small_digits, tmp_path, progress=False)
    assert second.from_cache and isinstance(second.features, np.memmap)
    np.testing.assert_array_equal(second.features, first.features)
    np.testing.assert_array_equal(second.labels, first.labels)
    index = json.loads((second.path / "index.json").read_text())
    assert index["key"]["backbone_sha256"] == backbones[0].sha256 and index["shape"] == [60, 512]
    assert not [p for p in second.path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cache_of_another_backbone_is_detected_and_rebuilt(backbones, small_digits, tmp_path, caplog):
    a, b = backbones
    fa = cached_features(a, small_digits, tmp_path, progress=False)
    target = cache_folder(tmp_path, cache_key(b, small_digits, 16, "avg"))
    shutil.copytree(fa.path, target)  # b's cache place holds a's features
    with caplog.at_level(logging.WARNING):
        fb = cached_features(b, small_digits, tmp_path, progress=False)
    assert not fb.from_cache and fb.path == target
    assert "another backbone_sha256" in caplog.text and "rebuilding" in caplog.text
    assert not np.allclose(fb.features, fa.features)
    assert cached_features(b, small_digits, tmp_path, progress=False).from_cache


def test_cache_of_another_code_version_or_data_is_rebuilt(backbones, small_digits, tmp_path, caplog, monkeypatch):
    bb = backbones[0]
    cached_features(bb, small_digits, tmp_path, progress=False)
    monkeypatch.setattr(feature_cache, "CACHE_VERSION", feature_cache.CACHE_VERSION + 1)
    with caplog.at_level(logging.WARNING):
        assert not cached_features(bb, small_digits, tmp_path, progress=False).from_cache
    assert "another code_version" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # same folder, other data (5 images per class instead of 6)
        fs = cached_features(bb, limit_per_class(digits_source(), 5), tmp_path, progress=False)
    assert not fs.from_cache and fs.features.shape[0] == 50 and "another data" in caplog.text


def test_damaged_cache_is_rebuilt(backbones, small_digits, tmp_path, caplog):
    fs = cached_features(backbones[0], small_digits, tmp_path, progress=False)
    np.save(fs.path / "features.npy", np.zeros((3, 512), dtype=np.float32))
    with caplog.at_level(logging.WARNING):
        again = cached_features(backbones[0], small_digits, tmp_path, progress=False)
    assert not again.from_cache and again.features.shape == (60, 512)
    assert "do not match their index" in caplog.text


def test_corrupt_image_is_skipped_with_a_warning_and_counted(backbones, tmp_path):
    root = tmp_path / "data"
    folder = root / "fungi"
    for c in range(5):
        (folder / f"f{c}").mkdir(parents=True)
        for i in range(3):
            (folder / f"f{c}" / f"{i}.png").write_bytes(image_bytes(10 * c + i))
    (folder / "f2" / "1.png").write_bytes(image_bytes(0)[:40])  # truncated PNG
    (folder / "splits.json").write_text(json.dumps({"train": [], "valid": [], "test": [f"f{c}" for c in range(5)]}))
    source = open_source("fungi", root)
    with pytest.warns(UserWarning, match="skipping corrupt image f2/1.png"):
        fs = cached_features(backbones[0], source, tmp_path / "cache", progress=False)
    assert fs.skipped == ["f2/1.png"] and fs.features.shape[0] == 14
    assert fs.counts.tolist() == [3, 3, 2, 3, 3]
    cached = cached_features(backbones[0], source, tmp_path / "cache", progress=False)
    assert cached.from_cache and cached.skipped == ["f2/1.png"]


def test_cache_key_tells_fp16_autocast_from_fp32(backbones, small_digits, tmp_path, caplog):
    from metadataset.features import precision_of

    assert precision_of("cpu") == "fp32" and precision_of("cuda:1") == "fp16-autocast"
    bb = backbones[0]
    fp32 = cache_key(bb, small_digits, 16, "avg", "fp32")
    fp16 = cache_key(bb, small_digits, 16, "avg", "fp16-autocast")
    assert fp32 != fp16 and cache_folder(tmp_path, fp32) != cache_folder(tmp_path, fp16)
    cpu = cached_features(bb, small_digits, tmp_path, progress=False)
    assert cpu.path == cache_folder(tmp_path, fp32)
    shutil.copytree(cpu.path, cache_folder(tmp_path, fp16))  # a GPU entry's folder holding fp32 features
    with caplog.at_level(logging.WARNING):
        assert feature_cache.load_cached(cache_folder(tmp_path, fp16), fp16) is None
    assert "another precision" in caplog.text
