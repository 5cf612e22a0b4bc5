"""The synthetic generator: layout and counts, disjoint sets, exact masks, seeded determinism."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsad_bench.adapters.synthetic import synthesize
from zsad_bench.data import DATASETS, Dataset, open_dataset


@pytest.fixture(scope="module")
def both() -> Dataset:
    return open_dataset("synthetic")


def _load(which: str) -> Dataset:
    return DATASETS.get("synthetic").load(Path(which))


def test_layout_counts_and_disjoint_sets(both: Dataset) -> None:
    textures, objects = _load("textures"), _load("objects")
    assert textures.categories == ["weave", "marble", "mesh"]
    assert objects.categories == ["cap", "capsule", "nut"]
    assert both.categories == textures.categories + objects.categories
    assert both.samples == textures.samples + objects.samples
    assert textures.root.parent == objects.root.parent == both.root
    for cat in both.categories:
        per = Counter((s.split, s.defect_type) for s in both if s.category == cat)
        defects = {d for _, d in per} - {"good"}
        assert per[("train", "good")] == 10 and per[("test", "good")] == 10
        assert len(defects) == 3 and all(per[("test", d)] == 5 for d in defects)
    with Image.open(both.samples[0].image_path) as img:
        assert img.size == (160, 160) and img.mode == "RGB"


def test_reused_from_cache(both: Dataset) -> None:
    stamp = both.samples[0].image_path.stat().st_mtime_ns
    again = open_dataset("synthetic")
    assert again.root == both.root
    assert again.samples[0].image_path.stat().st_mtime_ns == stamp


def test_masks_are_exactly_the_modified_pixels(both: Dataset) -> None:
    anomalous = [s for s in both if s.label == 1]
    assert len(anomalous) == 6 * 15
    for s in anomalous:
        image = np.asarray(Image.open(s.image_path))
        mask = np.asarray(Image.open(s.mask_path))
        assert set(np.unique(mask)) == {0, 255}
        clean = synthesize(s.category, s.split, s.defect_type, int(s.image_path.stem)).clean
        changed = (image != clean).any(axis=-1)
        assert np.array_equal(changed, mask == 255), s.key
    for s in [s for s in both if s.label == 0][::7]:  # normal files are the clean renderings
        clean = synthesize(s.category, s.split, s.defect_type, int(s.image_path.stem)).image
        assert np.array_equal(np.asarray(Image.open(s.image_path)), clean)


def test_seeds() -> None:
    for cat, defect in (("marble", "crack"), ("nut", "hole")):
        a, b = synthesize(cat, "test", defect, 2, seed=0), synthesize(cat, "test", defect, 2, seed=0)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
        c = synthesize(cat, "test", defect, 2, seed=1)
        assert not np.array_equal(a.image, c.image) and not np.array_equal(a.mask, c.mask)


def test_normal_images_vary_and_stains_are_faint(both: Dataset) -> None:
    for cat in both.categories:
        train = [np.asarray(Image.open(s.image_path), np.float32) for s in both if s.category == cat][:10]
        diffs = [np.abs(a - b).mean() for a, b in itertools.pairwise(train)]
        assert min(diffs) > 5, cat  # colour, pose, lighting and phase change from image to image
    for s in [s for s in both if s.defect_type == "stain"]:
        image = np.asarray(Image.open(s.image_path), np.float32)
        clean = synthesize(s.category, s.split, s.defect_type, int(s.image_path.stem)).clean.astype(np.float32)
        inside = np.asarray(Image.open(s.mask_path)) > 0
        assert 3 < np.abs(image - clean)[inside].mean() < 25, s.key
