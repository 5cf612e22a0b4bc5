"""pytest-benchmark of the metric hot paths at a small size: ``pytest benchmarks --benchmark-enable``.

The reference is the MVTec AD algorithm from ``bench_metrics.py`` (global float64 argsort); every
benchmark also checks that its values agree with the reference to 1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
from bench_metrics import reference_metrics, synthetic_split

from zsad_bench.metrics import MetricAccumulator
from zsad_bench.metrics._ranking import rank

N_MAPS, SIZE = 120, 128


@pytest.fixture(scope="module")
def split() -> tuple[np.ndarray, np.ndarray]:
    pairs = list(synthetic_split(N_MAPS, SIZE, seed=1))
    return np.stack([m for m, _ in pairs]), np.stack([g for _, g in pairs])


@pytest.fixture(scope="module")
def expected(split: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    maps, masks = split
    return reference_metrics(list(maps), list(masks), 0.3)


def test_streaming_aupro_and_pixel_auroc(benchmark, split, expected) -> None:
    maps, masks = split

    def run() -> dict[str, float]:
        acc = MetricAccumulator(("aupro", "pixel_auroc"))
        for lo in range(0, N_MAPS, 16):
            acc.update(maps[lo : lo + 16], masks[lo : lo + 16], None, None)
        return acc.compute()

    got = benchmark(run)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6)


def test_all_metrics_compute_only(benchmark, split) -> None:
    maps, masks = split
    acc = MetricAccumulator()
    acc.update(maps, masks, maps.max(axis=(1, 2)), masks.any(axis=(1, 2)).astype(int))
    got = benchmark(acc.compute)
    assert all(0.0 <= v <= 1.0 for v in got.values())


def test_rank_search(benchmark, split) -> None:
    maps, masks = split
    neg, pos = np.sort(maps[~masks]), maps[masks]
    r = benchmark(rank, neg, pos)
    assert int(r.counts.sum()) == pos.size
    assert np.array_equal(r.neg_lt, np.searchsorted(neg, r.values, "left"))


def test_reference_algorithm(benchmark, split, expected) -> None:
    maps, masks = split
    got = benchmark(reference_metrics, list(maps), list(masks), 0.3)
    assert got == expected
