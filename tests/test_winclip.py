"""WinCLIP: window bookkeeping, harmonic aggregation, prompt ensemble and scoring on a tiny random CLIP."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from zsad_bench.backbones import BACKBONES, create_backbone
from zsad_bench.backbones.base import Backbone, Features, Preprocess
from zsad_bench.backbones.testing import tiny_config
from zsad_bench.data.records import Sample
from zsad_bench.detector import Batch, FitContext, create_method, get_method_class, list_methods
from zsad_bench.errors import ZsadError
from zsad_bench.methods.winclip import (
    anomaly_probability,
    harmonic_aggregation,
    prompt_ensemble,
    window_indices,
)
from zsad_bench.results import RunResult
from zsad_bench.runner import RunSpec, run_experiment
from zsad_bench.source import FeatureSource


def tiny_clip(seed: int = 0) -> Backbone:
    """The ``openclip`` backbone on a tiny random CLIP (vision width 64, joint space 16) at 56 px: 4x4 patches."""
    torch.manual_seed(seed)
    return create_backbone("openclip", config=tiny_config("openclip"), image_size=56)


def _samples(n: int, category: str = "metal_nut") -> list[Sample]:
    return [Sample(f"/x/{i}.png", category, i % 2, None, "good", "test") for i in range(n)]


def image_source(n: int = 6) -> FeatureSource:
    """Random 56 px images; anomalous ones (odd index) have a rectangular mask."""
    samples = _samples(n)
    g = torch.Generator().manual_seed(0)
    images = {s.image_path: torch.randn(3, 56, 56, generator=g) for s in samples}

    def mask(sample, size):
        m = np.zeros((size, size), bool)
        m[14:28, 14:42] = bool(sample.label)
        return m

    return FeatureSource(samples, 56, None, mask, lambda s: images[s.image_path])


def test_window_indices_match_hand_layout():
    assert window_indices(3, 2).tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    assert window_indices(4, 3).shape == (4, 9)
    with pytest.raises(ZsadError, match="scales"):
        window_indices(2, 3)


def test_harmonic_aggregation_hand_case():
    # 3x3 grid, 2x2 windows scored 1, 3/4, 1/2, 1/4: the centre patch is covered by all four windows,
    # its harmonic mean is 4 / (1 + 4/3 + 2 + 4) = 0.48.
    out = harmonic_aggregation(torch.tensor([[1.0, 0.75, 0.5, 0.25]]), 3, 2)
    expected = torch.tensor([[1.0, 6 / 7, 0.75], [2 / 3, 0.48, 0.375], [0.5, 1 / 3, 0.25]])
    torch.testing.assert_close(out[0], expected)


@pytest.mark.parametrize(("grid", "k"), [(5, 2), (5, 3), (4, 4), (6, 1)])
def test_harmonic_aggregation_matches_direct_loop(grid, k):
    g = torch.Generator().manual_seed(grid * 10 + k)
    scores = torch.rand(2, (grid - k + 1) ** 2, generator=g) + 0.05
    idx = window_indices(grid, k)
    expected = torch.zeros(2, grid * grid)
    for p in range(grid * grid):
        covering = [w for w in range(len(idx)) if p in idx[w].tolist()]
        for b in range(2):
            expected[b, p] = len(covering) / sum(1.0 / scores[b, w].item() for w in covering)
    torch.testing.assert_close(harmonic_aggregation(scores, grid, k), expected.reshape(2, grid, grid))


def test_prompt_ensemble_composition():
    normal, anomalous = prompt_ensemble("metal nut")
    assert len(normal) == 7 * 21 and len(anomalous) == 4 * 21
    assert normal[0] == "a cropped photo of the metal nut."
    assert anomalous[0] == "a cropped photo of the damaged metal nut."
    assert "a photo of a metal nut without defect for anomaly detection." in normal


def test_anomaly_probability_hand_case():
    emb = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 5.0]])  # normal along x, anomalous along y
    out = anomaly_probability(emb, text, temperature=0.5)
    # cosine (1, 0) / 0.5 -> softmax anomalous = 1 / (1 + e^2); cosine (0, 1) -> e^2 / (1 + e^2)
    expected = torch.tensor([1 / (1 + math.e**2), math.e**2 / (1 + math.e**2)])
    torch.testing.assert_close(out, expected)


def test_tower_embed_and_pool_reproduce_open_clip_image_embedding():
    bb = tiny_clip()
    x = torch.randn(2, 3, 56, 56)
    ours = bb.tower.pool(bb.tower.run_blocks(bb.tower.embed(x)))
    torch.testing.assert_close(ours, bb.model.encode_image(x), atol=1e-5, rtol=1e-5)


def test_predict_whole_grid_window_equals_image_score():
    """A window covering the whole 4x4 grid is the image itself: the fused map is flat at the image score."""
    bb = tiny_clip()
    det = create_method("winclip", bb, scales=(4,))
    images = torch.randn(3, 3, 56, 56)
    pred = det.predict(Batch(_samples(3), None, images))
    text = bb.encode_text([*prompt_ensemble("metal nut")[0], *prompt_ensemble("metal nut")[1]])
    text = torch.stack([text[:147].mean(0), text[147:].mean(0)])
    cos = (
        torch.nn.functional.normalize(bb.model.encode_image(images), dim=-1)
        @ torch.nn.functional.normalize(text, dim=-1).T
    )
    expected = (cos / 0.07).softmax(-1)[:, 1]
    torch.testing.assert_close(pred.scores, expected, atol=1e-5, rtol=1e-4)
    assert pred.maps.shape == (3, 56, 56)
    torch.testing.assert_close(pred.maps, expected[:, None, None].expand(3, 56, 56), atol=1e-5, rtol=1e-4)


def test_predict_default_scales_shapes_and_range():
    det = create_method("winclip", tiny_clip())
    pred = det.predict(Batch(_samples(2), None, torch.randn(2, 3, 56, 56)))
    assert pred.maps.shape == (2, 56, 56) and pred.scores.shape == (2,)
    assert float(pred.maps.min()) > 0 and float(pred.maps.max()) < 1


def test_registration_and_backbone_restriction():
    assert "winclip" in list_methods(learning_type="training-free")
    with pytest.raises(ZsadError, match="openclip"):
        create_method("winclip", _NoText())
    cls = get_method_class("winclip")
    assert cls.default_backbone == "openclip-vitb16plus"  # the paper's and anomalib's ViT-B-16-plus-240
    assert BACKBONES.get("openclip-vitb16plus").image_size == 240  # 15x15 patches of 16 px


class _NoText(Backbone):
    name = "effnet-lite0"
    source = "test"
    patch_size = 8
    embed_dim = 4
    preprocess = Preprocess(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    def forward_features(self, images: torch.Tensor, layers=None) -> Features:
        raise NotImplementedError


def run_tiny_synthetic(method: str, backbone: str, out: Path, **method_config: Any) -> RunResult:
    """One small synthetic leg through the runner: textures/weave as auxiliary set, objects/cap as target."""
    spec = RunSpec(
        method,
        backbone=backbone,
        protocol=None,
        aux=["synthetic:textures"],
        aux_categories=["weave"],
        targets=["synthetic:objects"],
        categories=["cap"],
        backbone_kwargs={"config": tiny_config(backbone)},
        image_size=56,
        method_config=method_config,
        progress=False,
        out=out,
    )
    result, _ = run_experiment(spec)
    return result


@pytest.mark.slow
def test_end_to_end_synthetic(tmp_path: Path):
    result = run_tiny_synthetic("winclip", "openclip", tmp_path / "r.json")
    (record,) = result.records
    assert record.category == "cap" and record.n_images == 25
    assert all(0.0 <= record.metrics[m] <= 1.0 for m in ("image_auroc", "pixel_auroc", "aupro"))


def _half_min_cosine_distance(x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """anomalib utils.visual_association_score written out: min over memory rows of (1 - cos) / 2, one at a time."""
    out = torch.empty(x.shape[:-1])
    flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1)
    for i, row in enumerate(flat_x):
        dists = [(1 - torch.dot(row, m) / (row.norm() * m.norm())) / 2 for m in memory]
        flat_out[i] = min(dists)
    return out


def test_winclipplus_against_independent_few_shot_computation():
    """One whole-grid window (scales=(4,)) on a 4x4 grid: every term is an open_clip output written out by hand.

    anomalib torch_model.py:299-303 (averages), 342-375 (few-shot maps), utils.py visual_association_score.
    """
    bb = tiny_clip(seed=7)
    det = create_method("winclipplus", bb, scales=(4,))
    g = torch.Generator().manual_seed(8)
    refs, tests = torch.randn(2, 3, 56, 56, generator=g), torch.randn(3, 3, 56, 56, generator=g)
    det.fit(
        FeatureSource(_samples(2), 56, None, None, lambda s: refs[int(s.image_path[3])]),
        FitContext(torch.device("cpu")),
    )
    pred = det.predict(Batch(_samples(3), None, tests))

    v = bb.model.visual
    v.output_tokens = True
    with torch.no_grad():
        ref_pooled, ref_tokens = v(refs)  # tokens: ln_post of the last block, no projection (anomalib's patches)
        test_pooled, test_tokens = v(tests)
        text = bb.model.encode_text(
            open_clip.tokenize([*prompt_ensemble("metal nut")[0], *prompt_ensemble("metal nut")[1]])
        )
    text = torch.stack([text[:147].mean(0), text[147:].mean(0)])
    cos = F.normalize(test_pooled, dim=-1) @ F.normalize(text, dim=-1).T
    zero = (cos / 0.07).softmax(-1)[:, 1]  # whole image and the one window coincide: a flat zero-shot map
    patch_level = _half_min_cosine_distance(test_tokens, ref_tokens.reshape(-1, ref_tokens.shape[-1]))
    window_level = _half_min_cosine_distance(test_pooled, ref_pooled)  # one window = the image
    few = (patch_level.reshape(3, 4, 4) + window_level[:, None, None]) / 2
    expected_map = F.interpolate(((zero[:, None, None] + few) / 2)[:, None], size=(56, 56), mode="bilinear")[:, 0]
    torch.testing.assert_close(pred.scores, (zero + few.flatten(1).amax(1)) / 2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pred.maps, expected_map, atol=1e-5, rtol=1e-4)

    # a test image among the references has visual association 0 everywhere
    same = det.few_shot(*det.encode(refs[:1])[1:3], 4)
    torch.testing.assert_close(same, torch.zeros(1, 4, 4), atol=1e-5, rtol=0)
    # the reference memory round-trips through state_dict
    fresh = create_method("winclipplus", tiny_clip(seed=7), scales=(4,))
    fresh.load_state_dict(det.state_dict())
    torch.testing.assert_close(fresh.predict(Batch(_samples(3), None, tests)).maps, pred.maps)
    with pytest.raises(ZsadError, match="windows_2"):
        create_method("winclipplus", tiny_clip(seed=7)).load_state_dict(det.state_dict())
    assert "winclipplus" in list_methods(learning_type="few-shot")
