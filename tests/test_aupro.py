"""Both AUPRO variants against slow per-threshold references written here and hand-computed cases."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import measure
from sklearn.metrics import auc

from zsad_bench.errors import ZsadError
from zsad_bench.metrics import MetricAccumulator, UndefinedMetricWarning, aupro, aupro_cflow


def _regions(masks: list[np.ndarray]) -> list[tuple[int, np.ndarray]]:
    """(image index, boolean region) for every 8-connected GT region (skimage, not scipy)."""
    out = []
    for i, mask in enumerate(masks):
        labels = measure.label(mask, connectivity=2)
        out += [(i, labels == k) for k in range(1, labels.max() + 1)]
    return out


def slow_aupro(maps: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float = 0.3) -> float:
    """MVTec definition, one threshold at a time: predict ``score >= t`` for every distinct score."""
    regions = _regions(masks)
    n_normal = sum(int((~m).sum()) for m in masks)
    values = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    points = [(0.0, 0.0)]
    for t in values:
        preds = [m >= t for m in maps]
        fpr = sum(int((p & ~g).sum()) for p, g in zip(preds, masks, strict=True)) / n_normal
        pro = float(np.mean([(preds[i] & r).sum() / r.sum() for i, r in regions]))
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # interpolate the point at exactly fpr_limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def slow_aupro_cflow(maps: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """The cflow-ad / SPG-release loop: 200 thresholds, ``score > t``, FPR < 0.3, min-max rescale, sklearn auc."""
    amaps, gts = np.stack(maps), np.stack(masks)
    lo, hi = amaps.min(), amaps.max()
    fprs, pros = [], []
    for t in np.arange(lo, hi, (hi - lo) / 200):
        pred = amaps > t
        per_region = []
        for p, g in zip(pred, gts, strict=True):
            for region in measure.regionprops(measure.label(g)):
                per_region.append(p[region.coords[:, 0], region.coords[:, 1]].sum() / region.area)
        pros.append(np.mean(per_region))
        fprs.append(np.logical_and(pred, ~gts).sum() / (~gts).sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < 0.3
    f = fprs[keep]
    return float(auc((f - f.min()) / (f.max() - f.min() + 1e-12), pros[keep]))


def random_case(seed: int, n: int = 6, size: int = 16, levels: int | None = None):
    """Maps with blob defects; ``levels`` quantises scores so that many ties occur."""
    rng = np.random.default_rng(seed)
    masks = []
    for i in range(n):
        m = np.zeros((size, size), dtype=bool)
        for _ in range(rng.integers(1, 4) if i % 3 else 0):
            y, x = rng.integers(0, size - 2, 2)
            h, w = rng.integers(1, size // 3, 2)
            m[y : y + h, x : x + w] = True
        masks.append(m)
    maps = [(rng.random((size, size)) + 0.7 * rng.random() * m).astype(np.float32) for m in masks]
    if levels:
        maps = [(np.round(m * levels) / levels).astype(np.float32) for m in maps]
    return maps, masks


@pytest.mark.parametrize(("seed", "levels"), [(0, None), (1, 8), (2, 3), (3, 50)])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_exact_aupro_matches_per_threshold_reference(seed: int, levels: int | None, fpr_limit: float) -> None:
    maps, masks = random_case(seed, levels=levels)
    assert aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(slow_aupro(maps, masks, fpr_limit), abs=1e-6)


@pytest.mark.parametrize(("seed", "levels"), [(4, None), (5, 6), (6, 40)])
def test_cflow_aupro_matches_release_loop(seed: int, levels: int | None) -> None:
    maps, masks = random_case(seed, levels=levels)
    assert aupro_cflow(maps, masks) == pytest.approx(slow_aupro_cflow(maps, masks), abs=1e-6)


def test_exact_aupro_two_regions_by_hand() -> None:
    # Region A: 1 pixel scored 0.9; region B: 2 pixels scored 0.8 and 0.1 (not 8-connected to A).
    # Normals: 0.95, 0.5 and seven 0.0 -> curve (0,0) (1/9,0) (1/9,.5) (1/9,.75) (2/9,.75) (2/9,1) (1,1).
    # Area to 0.3: 0.75 * 1/9 + 1 * (0.3 - 2/9) = 29/180; divided by 0.3: 29/54.
    amap = np.array([[0.9, 0.95, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.8, 0.1]], dtype=np.float32)
    mask = np.zeros((3, 4), dtype=bool)
    mask[0, 0] = mask[2, 2] = mask[2, 3] = True
    assert aupro([amap], [mask]) == pytest.approx(29 / 54, abs=1e-9)
    # 8-connectivity: (0,0) touches (1,1) diagonally, so {(0,0), (1,1), (1,2)} is ONE region of 3 pixels.
    # (0,0) scores 0.9, the other two 0.1, nine normals 0.2: PRO is 1/3 until FPR 1 -> AUPRO 1/3
    # (4-connectivity would give regions of 1 and 2 pixels and PRO 1/2).
    diag = np.zeros((3, 4), dtype=bool)
    diag[0, 0] = diag[1, 1] = diag[1, 2] = True
    dmap = np.array([[0.9, 0.2, 0.2, 0.2], [0.2, 0.1, 0.1, 0.2], [0.2, 0.2, 0.2, 0.2]], dtype=np.float32)
    assert aupro([dmap], [diag]) == pytest.approx(1 / 3, abs=1e-9)


def test_exact_aupro_ties_are_one_threshold() -> None:
    # Anomalous pixel and two normals tie at 0.5: one segment (0,0)->(2/3,1); at FPR 0.3 PRO is 0.45.
    amap = np.array([[0.5, 0.5, 0.5, 0.0]], dtype=np.float32)
    mask = np.array([[True, False, False, False]])
    assert aupro([amap], [mask]) == pytest.approx(0.3 * 0.45 / 2 / 0.3, abs=1e-9)


def test_exact_and_cflow_differ_as_computed_by_hand() -> None:
    # One anomalous pixel (0.61) among normals 1.0, 0.41, 0.21 and seven 0.0.
    # Exact: (0,0) (.1,0) (.1,1) (.2,1) (.3,1) -> area 0.2 / 0.3 = 2/3.
    # cflow: kept FPRs are 0.1 and 0.2 (0.3 is not < 0.3), rescaled to 0 and 1 with PRO 1 -> 1.0.
    amap = np.array([[0.61, 1.0, 0.41, 0.21, 0, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    mask = np.zeros_like(amap, dtype=bool)
    mask[0, 0] = True
    assert aupro([amap], [mask]) == pytest.approx(2 / 3, abs=1e-9)
    assert aupro_cflow([amap], [mask]) == pytest.approx(1.0, abs=1e-9)


def test_empty_masks() -> None:
    # A normal image only adds normal pixels: the hand case above plus 9 normal pixels at 0.96.
    amap = np.array([[0.9, 0.95, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.8, 0.1]], dtype=np.float32)
    mask = np.zeros((3, 4), dtype=bool)
    mask[0, 0] = mask[2, 2] = mask[2, 3] = True
    normal_map = np.full((3, 3), 0.96, dtype=np.float32)
    # N = 18: 0.96 x9 -> FPR .5 already > .3 with PRO 0 -> area 0.
    assert aupro([amap, normal_map], [mask, np.zeros((3, 3), bool)]) == 0.0
    low_normal = np.zeros((3, 3), dtype=np.float32)
    # N = 18: (1/18, 0) -> PRO .75 to 2/18 -> PRO 1 to 0.3: (.75/18 + (.3 - 2/18)) / .3
    expected = (0.75 / 18 + (0.3 - 2 / 18)) / 0.3
    assert aupro([amap, low_normal], [mask, np.zeros((3, 3), bool)]) == pytest.approx(expected, abs=1e-9)
    with pytest.warns(UndefinedMetricWarning, match="0 anomalous pixels"):
        assert np.isnan(aupro([normal_map], [np.zeros((3, 3), bool)]))
    with pytest.warns(UndefinedMetricWarning):
        assert np.isnan(aupro_cflow([normal_map], [np.zeros((3, 3), bool)]))


def test_nan_map_names_the_image() -> None:
    maps, masks = random_case(7)
    maps[2][0, 0] = np.nan
    acc = MetricAccumulator(("aupro",))
    with pytest.raises(ZsadError, match=r"bad_one\.png"):
        acc.update(
            np.stack(maps), np.stack(masks), None, None, [f"img{i}.png" if i != 2 else "bad_one.png" for i in range(6)]
        )


@pytest.mark.realmini
def test_real_masks_match_reference(realmini: Path) -> None:
    """Real MVTec bottle masks (irregular shapes, several regions) at 48x48 with synthetic maps."""
    files = sorted((realmini / "mvtec_ad" / "bottle" / "ground_truth").glob("*/*.png"))[::6]
    assert files, "realmini bottle masks missing"
    rng = np.random.default_rng(0)
    masks = [np.asarray(Image.open(f).convert("L").resize((48, 48), Image.Resampling.NEAREST)) > 0 for f in files]
    masks += [np.zeros((48, 48), dtype=bool)] * 3
    maps = [(np.round(rng.random(m.shape) * 30) / 30 + 0.5 * m * rng.random()).astype(np.float32) for m in masks]
    assert aupro(maps, masks) == pytest.approx(slow_aupro(maps, masks), abs=1e-6)
    assert aupro_cflow(maps, masks) == pytest.approx(slow_aupro_cflow(maps, masks), abs=1e-6)
