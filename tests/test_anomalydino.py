"""AnomalyDINO plugin: kNN distance, top-1% score, smoothing and masking against independent references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from tests.fakes import GridBackbone
from zsad_bench.data.records import Sample
from zsad_bench.detector import FitContext, LearningType, create_method
from zsad_bench.errors import ZsadError
from zsad_bench.methods.anomalydino import (
    AnomalyDINO,
    cosine_knn_distance,
    foreground_mask,
    mean_top_fraction,
)
from zsad_bench.postprocess import gaussian_smooth
from zsad_bench.source import FeatureSource, tensor_features


def _samples(n: int, labels: list[int] | None = None) -> list[Sample]:
    labels = labels or [0] * n
    return [Sample(Path(f"img{i}.png"), "cat", labels[i], None, "good", "test") for i in range(n)]


def _brute_force(queries: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    out = []
    for q in queries:
        dists = sorted(1.0 - float(q @ b) / (np.linalg.norm(q) * np.linalg.norm(b)) for b in bank)
        out.append(np.mean(dists[:k]))
    return np.array(out)


@pytest.mark.parametrize("k", [1, 3])
def test_knn_distance_matches_brute_force(k: int) -> None:
    gen = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(17, 5, generator=gen), torch.randn(23, 5, generator=gen) * 3
    got = cosine_knn_distance(queries, bank, k=k, chunk=4).numpy()
    np.testing.assert_allclose(got, _brute_force(queries.numpy(), bank.numpy(), k), atol=1e-5)


def test_mean_top_one_percent() -> None:
    values = torch.arange(250, dtype=torch.float32)[None]  # int(2.5) = 2 -> mean of 249 and 248
    assert mean_top_fraction(values).item() == pytest.approx(248.5)
    small = torch.tensor([[0.1, 0.7, 0.3]])  # int(0.03) = 0 -> the maximum
    assert mean_top_fraction(small).item() == pytest.approx(0.7)


@pytest.mark.parametrize("sigma", [1.5, 4.0])
def test_gaussian_smoothing_matches_scipy(sigma: float) -> None:
    maps = torch.rand(2, 21, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = np.stack([gaussian_filter(m, sigma=sigma) for m in maps.numpy()])
    np.testing.assert_allclose(gaussian_smooth(maps, sigma).numpy(), want, atol=1e-10)


def test_foreground_mask_keeps_the_dilated_object() -> None:
    grid = torch.zeros(12, 12, 4)
    grid[3:9, 3:9, 0] = 40.0  # the "object" (> 35% of the centre crop): large along one direction
    grid += 0.01 * torch.randn(12, 12, 4, generator=torch.Generator().manual_seed(2))
    want = np.zeros((12, 12), bool)
    want[2:10, 2:10] = True  # object dilated by the 3x3 kernel; closing changes nothing on a rectangle
    np.testing.assert_array_equal(foreground_mask(grid).numpy(), want)


def test_detector_scores_the_odd_patch() -> None:
    gen = torch.Generator().manual_seed(3)
    normal = torch.zeros(2, 8, 8, 6)
    normal[..., 0] = 1.0
    normal += 0.01 * torch.randn(normal.shape, generator=gen)
    test = torch.zeros(2, 8, 8, 6)
    test[..., 0] = 1.0
    test[1, 5, 2] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # orthogonal to every reference patch
    det = create_method("anomalydino", GridBackbone(32))
    assert det.learning_type is LearningType.FEW_SHOT
    det.fit(FeatureSource(_samples(2), 32, tensor_features(normal)), FitContext(torch.device("cpu")))
    assert det.bank.shape == (128, 6)

    (_, pred), *_ = list(det.predict_source(FeatureSource(_samples(2, [0, 1]), 32, tensor_features(test)), 2))
    bank = normal.reshape(-1, 6).numpy()
    for i in range(2):
        dist = _brute_force(test[i].reshape(-1, 6).numpy(), bank, 1)
        assert pred.scores[i].item() == pytest.approx(dist.max(), abs=1e-5)  # 64 patches: top 1% = max
    assert pred.scores[1].item() > 0.9 > 0.01 > pred.scores[0].item()
    assert pred.maps.shape == (2, 32, 32)
    peak = np.unravel_index(pred.maps[1].argmax().item(), (32, 32))
    assert 20 <= peak[0] < 24 and 8 <= peak[1] < 12  # inside the pixels of patch (5, 2)

    clone = AnomalyDINO(GridBackbone(32))
    clone.load_state_dict(det.state_dict())
    torch.testing.assert_close(clone.predict(_batch(test)).maps, pred.maps)


def _batch(grid: torch.Tensor):
    return next(FeatureSource(_samples(len(grid)), 32, tensor_features(grid)).batches(len(grid)))


def test_masking_zeroes_background_patches() -> None:
    grid = torch.zeros(1, 10, 10, 4)
    grid[0, 3:7, 4:8, 0] = 40.0
    grid[0, ..., 1] = 1.0
    det = create_method("anomalydino", GridBackbone(40), masking=True)
    det.bank = torch.tensor([[0.0, 0.0, 1.0, 0.0]])  # every patch is at distance 1 from the bank
    dist = det.patch_distances(grid)[0]
    assert dist[5, 5].item() == pytest.approx(1.0) and dist[0, 0].item() == 0.0


def test_bad_option_and_missing_bank_are_user_errors() -> None:
    with pytest.raises(ZsadError, match="knn_neighbors"):
        create_method("anomalydino", GridBackbone(32), knn_neighbors=0)
    with pytest.raises(ZsadError, match="before fit"):
        create_method("anomalydino", GridBackbone(32)).predict(_batch(torch.zeros(1, 8, 8, 6)))


@pytest.mark.slow
def test_synthetic_sets_end_to_end(tmp_path: Path) -> None:
    from zsad_bench.runner import RunSpec, run_experiment

    targets = ["synthetic:objects", "synthetic:textures"]
    spec = RunSpec("anomalydino", "effnet-lite0", None, targets=targets, categories=["nut", "mesh"], shots=1)
    spec.image_size, spec.out, spec.progress = 64, tmp_path / "r.json", False
    res, _ = run_experiment(spec)
    assert sorted(r.category for r in res.records) == ["mesh", "nut"]
    for r in res.records:
        assert r.n_images == 25 and all(0.0 <= r.metrics[m] <= 1.0 for m in ("image_auroc", "pixel_auroc"))
