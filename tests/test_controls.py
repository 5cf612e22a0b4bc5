"""Controls: the feature-norm scorer against a hand computation, the seeded random scorer, SPG's control preset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fakes import GridBackbone
from zsad_bench.cli.listing import method_details, method_rows
from zsad_bench.data.records import Sample
from zsad_bench.detector import Batch, LearningType, create_method, get_method_class
from zsad_bench.errors import ZsadError
from zsad_bench.methods.controls import featnorm_scores
from zsad_bench.presets import is_control, resolve
from zsad_bench.source import FeatureSource, tensor_features


def _samples(n: int) -> list[Sample]:
    return [Sample(Path(f"img{i}.png"), "cat", 0, None, "good", "test") for i in range(n)]


def _bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize with clamped edges (OpenCV INTER_LINEAR / align_corners=False)."""
    h, w = grid.shape
    out = np.zeros((size, size))
    for y in range(size):
        for x in range(size):
            sy = min(max((y + 0.5) * h / size - 0.5, 0.0), h - 1)
            sx = min(max((x + 0.5) * w / size - 0.5, 0.0), w - 1)
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = sy - y0, sx - x0
            top = grid[y0, x0] * (1 - fx) + grid[y0, x1] * fx
            bottom = grid[y1, x0] * (1 - fx) + grid[y1, x1] * fx
            out[y, x] = top * (1 - fy) + bottom * fy
    return out


def test_featnorm_by_hand() -> None:
    grid = torch.zeros(1, 2, 2, 2)
    grid[0, 0, 0] = torch.tensor([3.0, 4.0])  # norm 5
    grid[0, 0, 1] = torch.tensor([1.0, 0.0])  # norm 1
    grid[0, 1, 0] = torch.tensor([0.0, 2.0])  # norm 2
    grid[0, 1, 1] = torch.tensor([0.0, 4.0])  # norm 4; median of (1, 2, 4, 5) = 3
    assert featnorm_scores(grid)[0].tolist() == [[2.0, 2.0], [1.0, 1.0]]


def test_featnorm_detector_map_and_score() -> None:
    grids = torch.randn(3, 4, 4, 5, generator=torch.Generator().manual_seed(0))
    det = create_method("control-featnorm", GridBackbone(16, embed_dim=5))
    assert det.learning_type is LearningType.TRAINING_FREE and is_control(type(det))
    (batch,) = FeatureSource(_samples(3), 16, tensor_features(grids)).batches(3)
    pred = det.predict(batch)
    for i in range(3):
        norms = np.linalg.norm(grids[i].numpy(), axis=-1)
        want = _bilinear(np.abs(norms - np.median(norms)), 16)
        np.testing.assert_allclose(pred.maps[i].numpy(), want, atol=1e-5)
        assert pred.scores[i].item() == pytest.approx(want.max(), abs=1e-5)


def test_random_control_is_seeded_per_image() -> None:
    det = create_method("control-random", GridBackbone(8))
    samples = _samples(4)
    whole = det.predict(Batch(samples, None))
    halves = [det.predict(Batch(samples[i : i + 2], None)) for i in (0, 2)]
    torch.testing.assert_close(whole.scores, torch.cat([h.scores for h in halves]))
    torch.testing.assert_close(whole.maps, torch.cat([h.maps for h in halves]))
    assert whole.maps.shape == (4, 8, 8) and whole.scores.min() >= 0.0 and whole.scores.max() < 1.0
    other = create_method("control-random", GridBackbone(8), seed=1).predict(Batch(samples, None))
    assert not torch.equal(other.scores, whole.scores)


def test_controls_are_listed_apart() -> None:
    methods = [row[0] for row in method_rows()]
    controls = [row[0] for row in method_rows(controls=True)]
    assert {"control-random", "control-featnorm"} <= set(controls)
    assert not set(controls) & set(methods) and "musc" in methods


def test_spg_control_preset_trains_no_guides() -> None:
    spg = get_method_class("spg")
    control = resolve(spg, "control", "mvtec")
    assert control.config_overrides == {"guide_epochs": 0} and control.preset == "control"
    assert "control preset: guide_epochs=0" in method_details("spg")
    with pytest.raises(ZsadError, match="no control preset"):
        resolve(get_method_class("musc"), "control")
