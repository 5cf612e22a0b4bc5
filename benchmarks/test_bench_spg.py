"""pytest-benchmark of SPG's hot paths (run with ``pytest benchmarks/test_bench_spg.py --benchmark-enable``).

Sizes are the official ones on a DINOv3-L@448 grid: 784 tokens of width 1024, SAE H=4096, k=32,
maps 448 x 448 with σ=4 smoothing.
"""

from __future__ import annotations

import pytest
import torch

from zsad_bench.methods._spg_sae import (
    TopKSAE,
    aggregate_scores,
    anomaly_probability,
    cosine_to_guides,
    upsample_map,
)
from zsad_bench.postprocess import gaussian_smooth

TOKENS, DIM, WIDTH, K, GRID, SIZE = 784, 1024, 4096, 32, 28, 448


@pytest.fixture(scope="module")
def sae() -> TopKSAE:
    return TopKSAE(DIM, WIDTH, K, torch.Generator().manual_seed(0)).eval()


def test_sae_encode(benchmark, sae: TopKSAE) -> None:
    x = torch.randn(TOKENS, DIM)
    with torch.inference_mode():
        z = benchmark(sae.encode, x)
    assert z.shape == (TOKENS, WIDTH)
    assert int((z != 0).sum(1).max()) <= K


def test_guides_to_map(benchmark, sae: TopKSAE) -> None:
    """Guide decode D^T c + cosine + softmax + upsample + smoothing + max, for one image."""
    tokens = torch.randn(1, TOKENS, DIM)
    coef = torch.rand(2, WIDTH) * (torch.rand(2, WIDTH) < 0.05)

    def head() -> tuple[torch.Tensor, torch.Tensor]:
        guides = coef @ sae.atoms()
        prob = anomaly_probability(cosine_to_guides(tokens, guides), 0.07).view(1, GRID, GRID)
        maps = gaussian_smooth(upsample_map(prob, SIZE), 4.0)
        return maps, aggregate_scores(maps, "max")

    with torch.inference_mode():
        maps, score = benchmark(head)
    assert maps.shape == (1, SIZE, SIZE)
    assert 0.0 <= float(score[0]) <= 1.0


def test_map_postprocessing(benchmark) -> None:
    prob = torch.rand(8, GRID, GRID)

    def post() -> torch.Tensor:
        return aggregate_scores(gaussian_smooth(upsample_map(prob, SIZE), 4.0), "max")

    scores = benchmark(post)
    assert scores.shape == (8,)
    assert bool((scores <= prob.flatten(1).amax(1) + 1e-6).all())  # smoothing never exceeds the patch maximum
