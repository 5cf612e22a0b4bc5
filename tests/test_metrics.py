"""AUROC / AP / F1-max against sklearn, and the streaming accumulator's contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from zsad_bench.errors import ZsadError
from zsad_bench.metrics import (
    METRICS,
    MetricAccumulator,
    UndefinedMetricWarning,
    category_mean,
    f1_max,
    image_ap,
    image_auroc,
    pixel_ap,
    pixel_auroc,
)
from zsad_bench.metrics._ranking import sorted_search


def sk_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=precision + recall > 0
    )
    return float(f1.max())


def pixel_case(seed: int, n: int = 5, size: int = 12, levels: int | None = 10):
    rng = np.random.default_rng(seed)
    masks = rng.random((n, size, size)) < rng.uniform(0.0, 0.3, (n, 1, 1))
    masks[::3] = False  # some normal images
    maps = (rng.random((n, size, size)) + 0.6 * masks * rng.random((n, 1, 1))).astype(np.float32)
    if levels:
        maps = (np.round(maps * levels) / levels).astype(np.float32)
    return maps, masks


def test_metric_names() -> None:
    assert list(METRICS) == [
        "image_auroc",
        "image_ap",
        "image_f1_max",
        "pixel_auroc",
        "pixel_ap",
        "pixel_f1_max",
        "aupro",
        "aupro_cflow",
    ]


@pytest.mark.parametrize(("seed", "levels"), [(0, None), (1, 4), (2, 20)])
def test_image_metrics_match_sklearn(seed: int, levels: int | None) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(60) < 0.4).astype(int)
    scores = rng.random(60) + 0.5 * labels
    if levels:
        scores = np.round(scores * levels) / levels  # many ties
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_ap(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert f1_max(scores, labels) == pytest.approx(sk_f1_max(labels, scores), abs=1e-12)


@pytest.mark.parametrize(("seed", "levels"), [(3, None), (4, 10), (5, 3)])
def test_pixel_metrics_match_sklearn(seed: int, levels: int | None) -> None:
    maps, masks = pixel_case(seed, levels=levels)
    y, s = masks.ravel(), maps.ravel()
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert pixel_ap(maps, masks) == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert f1_max(list(maps), list(masks)) == pytest.approx(sk_f1_max(y, s), abs=1e-9)


def test_small_cases_by_hand() -> None:
    # Positives 0.8, 0.4; negatives 0.4, 0.1: pairs won 1 + 1 + 0.5 (tie) + 1 of 4 -> 0.875.
    assert image_auroc([0.8, 0.4, 0.4, 0.1], [1, 1, 0, 0]) == 0.875
    # Threshold 0.8: P 1, R .5; threshold 0.4: P 2/3, R 1 -> AP = .5 * 1 + .5 * 2/3; F1 max = 2*(2/3)/(5/3) = .8.
    assert image_ap([0.8, 0.4, 0.4, 0.1], [1, 1, 0, 0]) == pytest.approx(0.5 + 1 / 3)
    assert f1_max([0.8, 0.4, 0.4, 0.1], [1, 1, 0, 0]) == pytest.approx(0.8)


def test_streaming_equals_one_batch_and_accepts_torch() -> None:
    maps, masks = pixel_case(6, n=8)
    rng = np.random.default_rng(6)
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2)) + rng.random(8) * 0.1
    whole = MetricAccumulator()
    whole.update(maps, masks, scores, labels, [f"i{k}" for k in range(8)])
    parts = MetricAccumulator()
    for lo, hi in [(0, 3), (3, 4), (4, 8)]:
        parts.update(torch.from_numpy(maps[lo:hi]), torch.from_numpy(masks[lo:hi]), scores[lo:hi], labels[lo:hi])
    a, b = whole.compute(), parts.compute()
    assert list(a) == list(METRICS)
    for name in METRICS:
        assert a[name] == pytest.approx(b[name], abs=1e-12)
    assert a["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert a["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # compute() is repeatable, and later updates still count.
    assert whole.compute() == a
    whole.update(maps[:1] + 5.0, masks[:1], scores[:1], labels[:1])
    both_maps = np.concatenate([maps, maps[:1] + 5.0])
    both_masks = np.concatenate([masks, masks[:1]])
    assert whole.compute()["pixel_auroc"] == pytest.approx(
        roc_auc_score(both_masks.ravel(), both_maps.ravel()), abs=1e-9
    )


def test_image_only_without_maps() -> None:
    acc = MetricAccumulator(("image_auroc", "image_ap"))
    acc.update(None, None, np.array([0.1, 0.9, 0.4]), np.array([0, 1, 0]), ["a", "b", "c"])
    assert acc.compute() == {"image_auroc": 1.0, "image_ap": 1.0}
    full = MetricAccumulator(label="bottle")
    full.update(None, None, np.array([0.1, 0.9]), np.array([0, 1]))
    with pytest.warns(UndefinedMetricWarning, match="bottle: no anomaly maps"):
        out = full.compute()
    assert out["image_auroc"] == 1.0 and np.isnan(out["pixel_auroc"]) and np.isnan(out["aupro"])


def test_single_class_is_nan_with_warning() -> None:
    acc = MetricAccumulator(label="good_only")
    acc.update(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), bool), [0.2, 0.3], [0, 0])
    with pytest.warns(UndefinedMetricWarning, match="good_only"):
        out = acc.compute()
    assert all(np.isnan(v) for v in out.values())


def test_resolution_resizes_maps_and_masks() -> None:
    # 4x4 normal map (0.9), 4x4 fully anomalous map (0.5), 8x8 normal map (0.1). At 8x8 each image has
    # 64 pixels: the positives beat 64 of 128 negatives -> 0.5 (at native sizes it would be 64/80 = 0.8).
    acc = MetricAccumulator(("pixel_auroc",), resolution=8)
    acc.update(np.full((1, 4, 4), 0.9), np.zeros((1, 4, 4), bool), None, None)
    acc.update(np.full((1, 4, 4), 0.5), np.ones((1, 4, 4), bool), None, None)
    acc.update(np.full((1, 8, 8), 0.1), np.zeros((1, 8, 8), bool), None, None)
    assert acc.compute()["pixel_auroc"] == pytest.approx(0.5)
    native = MetricAccumulator(("pixel_auroc",))
    native.update(np.full((1, 4, 4), 0.9), np.zeros((1, 4, 4), bool), None, None)
    native.update(np.full((1, 4, 4), 0.5), np.ones((1, 4, 4), bool), None, None)
    native.update(np.full((1, 8, 8), 0.1), np.zeros((1, 8, 8), bool), None, None)
    assert native.compute()["pixel_auroc"] == pytest.approx(0.8)


def test_bad_input_errors_name_the_problem() -> None:
    with pytest.raises(ZsadError, match=r"unknown metric.*pro_auc"):
        MetricAccumulator(("pro_auc",))
    acc = MetricAccumulator()
    with pytest.raises(ZsadError, match=r"cat/003\.png: image score is inf"):
        acc.update(
            np.zeros((2, 4, 4)), np.zeros((2, 4, 4), bool), [0.1, np.inf], [0, 1], ["cat/002.png", "cat/003.png"]
        )
    with pytest.raises(ZsadError, match=r"x\.png: anomaly map \(4, 4\) and mask \(5, 5\)"):
        acc.update(np.zeros((1, 4, 4)), np.zeros((1, 5, 5), bool), [0.1], [0], ["x.png"])
    with pytest.raises(ZsadError, match="label 2"):
        acc.update(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool), [0.1], [2], ["y.png"])
    with pytest.raises(ZsadError, match="image metrics were requested"):
        acc.update(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool), None, None)
    assert acc.n_images == 0  # failed updates leave no partial state
    acc.update(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), bool), [0.1], [0])
    with pytest.raises(ZsadError, match="some batches have anomaly maps and some do not"):
        acc.update(None, None, [0.1], [1], ["z.png"])


def test_category_mean_skips_nan() -> None:
    per = {"a": {"image_auroc": 0.5, "aupro": float("nan")}, "b": {"image_auroc": 1.0, "aupro": 0.25}}
    assert category_mean(per) == {"image_auroc": 0.75, "aupro": 0.25}


@pytest.mark.parametrize("side", ["left", "right"])
def test_grouped_search_equals_numpy(side: str) -> None:
    rng = np.random.default_rng(9)
    hay = np.sort(np.round(rng.random(200_000) * 5000).astype(np.float32))  # many ties
    needles = np.unique(np.round(rng.random(60_000) * 6000).astype(np.float32) - 500)  # spans several groups
    assert np.array_equal(sorted_search(hay, needles, side), np.searchsorted(hay, needles, side))
