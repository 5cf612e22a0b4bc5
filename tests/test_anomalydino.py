"""AnomalyDINO plugin: kNN distance, top-1% score, rotations, masking and smoothing against independent references."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter, rotate

from zsad_bench.backbones.base import Backbone, Features, Preprocess
from zsad_bench.data.records import Sample
from zsad_bench.detector import FitContext, LearningType, create_method, get_method_class
from zsad_bench.errors import ZsadError
from zsad_bench.methods.anomalydino import (
    AnomalyDINO,
    cosine_knn_distance,
    foreground_mask,
    mean_top_fraction,
    rotate_images,
)
from zsad_bench.postprocess import gaussian_smooth
from zsad_bench.presets import resolve
from zsad_bench.source import FeatureSource


class PoolBackbone(Backbone):
    """Tokens = the mean colour of each 4x4 patch: a hand-made grid is the image of its repeated patches."""

    name = "pool-stub"
    patch_size = 4
    embed_dim = 3
    default_layers = ("last",)

    def __init__(self, size: int) -> None:
        super().__init__()
        self.preprocess = Preprocess(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def forward_features(self, images: torch.Tensor, layers=None) -> Features:
        return Features({"last": F.avg_pool2d(images, 4).permute(0, 2, 3, 1)})


def _image(grid: torch.Tensor) -> torch.Tensor:
    """``(B, h, w, 3)`` grid -> ``(B, 3, 4h, 4w)`` images whose 4x4 patch means are the grid."""
    return grid.permute(0, 3, 1, 2).repeat_interleave(4, 2).repeat_interleave(4, 3)


def _source(grid: torch.Tensor, samples: list[Sample]) -> FeatureSource:
    images = _image(grid)
    return FeatureSource(samples, images.shape[-1], None, images=lambda s: images[int(s.image_path.stem[3:])])


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
    normal = torch.zeros(2, 8, 8, 3)
    normal[..., 0] = 1.0
    normal += 0.01 * torch.randn(normal.shape, generator=gen)
    test = torch.zeros(2, 8, 8, 3)
    test[..., 0] = 1.0
    test[1, 5, 2] = torch.tensor([0.0, 1.0, 0.0])  # orthogonal to every reference patch
    det = create_method("anomalydino", PoolBackbone(32), rotate=False, smooth_at="input")
    assert det.learning_type is LearningType.FEW_SHOT and det.needs_images
    det.fit(_source(normal, _samples(2)), FitContext(torch.device("cpu")))
    assert det.bank.shape == (128, 3)

    (_, pred), *_ = list(det.predict_source(_source(test, _samples(2, [0, 1])), 2))
    bank = normal.reshape(-1, 3).numpy()
    for i in range(2):
        dist = _brute_force(test[i].reshape(-1, 3).numpy(), bank, 1)
        assert pred.scores[i].item() == pytest.approx(dist.max(), abs=1e-5)  # 64 patches: top 1% = max
    assert pred.scores[1].item() > 0.9 > 0.01 > pred.scores[0].item()
    assert pred.maps.shape == (2, 32, 32)
    peak = np.unravel_index(pred.maps[1].argmax().item(), (32, 32))
    assert 20 <= peak[0] < 24 and 8 <= peak[1] < 12  # inside the pixels of patch (5, 2)

    clone = AnomalyDINO(PoolBackbone(32), det.config)
    clone.load_state_dict(det.state_dict())
    torch.testing.assert_close(clone.predict(next(_source(test, _samples(2)).batches(2))).maps, pred.maps)


def test_rotation_matches_scipy_and_rot90() -> None:
    img = torch.randn(1, 2, 13, 13, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for k in (1, 2, 3):  # counter-clockwise as displayed, like OpenCV's positive angles
        torch.testing.assert_close(rotate_images(img, 90 * k), torch.rot90(img, k, (-2, -1)))
    want = np.stack([rotate(ch, 45, reshape=False, order=1, mode="reflect") for ch in img[0].numpy()])
    np.testing.assert_allclose(rotate_images(img, 45)[0].numpy(), want, atol=1e-10)


def test_bank_holds_the_eight_rotations_of_each_reference() -> None:
    grid = torch.rand(1, 6, 6, 3, generator=torch.Generator().manual_seed(5))
    det = create_method("anomalydino", PoolBackbone(24))
    det.fit(_source(grid, _samples(1)), FitContext(torch.device("cpu")))
    assert det.bank.shape == (8 * 36, 3)
    image = _image(grid).double()
    want = []
    for angle in (0, 45, 90, 135, 180, 225, 270, 315):  # official augment_image angles, in order
        turned = np.stack([rotate(ch, angle, reshape=False, order=1, mode="reflect") for ch in image[0].numpy()])
        want.append(F.avg_pool2d(torch.from_numpy(turned)[None], 4)[0].permute(1, 2, 0).reshape(-1, 3))
    want = F.normalize(torch.cat(want), dim=-1).float()
    torch.testing.assert_close(det.bank, want, atol=1e-5, rtol=1e-5)


def test_masking_follows_the_official_per_category_table() -> None:
    cls = get_method_class("anomalydino")
    assert resolve(cls, "paper", "mvtec").config_overrides == {"masking": "mvtec-table"}
    assert resolve(cls, "paper", "visa").config_overrides == {"masking": "on"}
    paper = resolve(cls, "paper", None)
    assert (paper.backbone, paper.image_size, paper.config_overrides) == ("dinov2-vits14", 448, {})
    grid = torch.zeros(2, 10, 10, 4)
    grid[:, 3:7, 4:8, 0] = 40.0
    grid[..., 1] = 1.0
    det = create_method("anomalydino", PoolBackbone(40), masking="mvtec-table")
    det.bank = torch.tensor([[0.0, 0.0, 1.0, 0.0]])  # every patch is at distance 1 from the bank
    # official table: capsule, hazelnut, pill, screw, toothbrush masked; bottle, carpet, ... not
    dist = det.patch_distances(grid, ["capsule", "bottle"])
    assert dist[0, 5, 5].item() == pytest.approx(1.0) and dist[0, 0, 0].item() == 0.0
    assert dist[1].min().item() == pytest.approx(1.0)
    on = create_method("anomalydino", PoolBackbone(40), masking="on")
    on.bank = det.bank
    assert on.patch_distances(grid, ["bottle", "candle"])[:, 0, 0].tolist() == [0.0, 0.0]


def test_layer_is_the_last_block_after_the_final_norm() -> None:
    assert AnomalyDINO.layers_for(SimpleNamespace(num_blocks=12, normed_layers=True)) == ("12:norm",)
    assert AnomalyDINO.layers_for(SimpleNamespace(num_blocks=12, normed_layers=False)) is None
    assert AnomalyDINO.layers_for(None) is None


def test_smoothing_at_the_original_resolution(tmp_path: Path) -> None:
    """Official dists2map: bilinear to the original size, Gaussian sigma 4 there; then (here) down to S."""
    Image.new("RGB", (48, 48)).save(tmp_path / "img0.png")
    sample = Sample(tmp_path / "img0.png", "cat", 1, None, "good", "test")
    det = create_method("anomalydino", PoolBackbone(24))
    dist = torch.rand(1, 6, 6, generator=torch.Generator().manual_seed(6))
    got = det.anomaly_maps(dist, [sample])[0].numpy()
    full = F.interpolate(dist[None], size=(48, 48), mode="bilinear", align_corners=False)[0, 0].double().numpy()
    smooth = gaussian_filter(full, sigma=4).astype(np.float32)
    want = np.asarray(Image.fromarray(smooth, mode="F").resize((24, 24), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_bad_option_and_missing_bank_are_user_errors() -> None:
    with pytest.raises(ZsadError, match="knn_neighbors"):
        create_method("anomalydino", PoolBackbone(32), knn_neighbors=0)
    with pytest.raises(ZsadError, match="masking"):
        create_method("anomalydino", PoolBackbone(32), masking="yes")
    with pytest.raises(ZsadError, match="before fit"):
        create_method("anomalydino", PoolBackbone(32)).predict(
            next(_source(torch.zeros(1, 8, 8, 3), _samples(1)).batches(1))
        )


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
