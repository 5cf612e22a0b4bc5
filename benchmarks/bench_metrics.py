"""Speed and memory of the streaming exact metrics vs the MVTec AD reference algorithm.

Synthetic MVTec-sized test split: ``--n`` maps (default 1,725, as MVTec AD's test set) of which 27 %
are normal, the rest with 1-4 elliptical defects of MVTec-like sizes. For each size, both sides get
the same maps:

* ours: ``MetricAccumulator(("aupro", "pixel_auroc"))`` fed image by image (streaming);
* reference: the MVTec AD evaluation algorithm (label each mask, concatenate all pixels as float64,
  one global argsort, cumulative sums, trapezoid to FPR 0.3); pixel AUROC from the same sort.

Wall-clock and process-CPU seconds count only the metric code (generating the maps is excluded;
CPU seconds are the fairer figure on a shared machine); peak memory is the
tracemalloc peak over the whole side, including the maps the reference must hold at once.

Usage: ``python benchmarks/bench_metrics.py [--sizes 256 448] [--n 1725]``
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable, Iterator

import numpy as np
from scipy import ndimage
from tabulate import tabulate

from zsad_bench.metrics import MetricAccumulator

NORMAL_FRACTION = 467 / 1725  # MVTec AD test split: 467 good of 1,725 images
EIGHT = np.ones((3, 3), dtype=bool)


def synthetic_split(n: int, size: int, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``n`` (float32 map, bool mask) pairs: smooth noise plus partial responses on the defects."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for _ in range(n):
        mask = np.zeros((size, size), dtype=bool)
        if rng.random() >= NORMAL_FRACTION:
            for _ in range(rng.integers(1, 5)):
                cy, cx = rng.random(2)
                ry, rx = np.exp(rng.uniform(np.log(0.01), np.log(0.2), 2))
                mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        coarse = rng.random((9, 9)).astype(np.float32)
        amap = ndimage.zoom(coarse, size / 9, order=1, grid_mode=True, mode="nearest")[:size, :size]
        amap += 0.6 * rng.random() * mask + 0.1 * rng.random((size, size), dtype=np.float32)
        yield amap.astype(np.float32), mask


class Clock:
    """Accumulates wall-clock and process CPU seconds over ``with`` blocks."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._t = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._t[0]
        self.cpu += time.process_time() - self._t[1]


def run_ours(n: int, size: int, fpr_limit: float) -> tuple[dict[str, float], Clock]:
    acc = MetricAccumulator(("aupro", "pixel_auroc"), fpr_limit=fpr_limit)
    clock = Clock()
    for i, (amap, mask) in enumerate(synthetic_split(n, size)):
        with clock:
            acc.update(amap[None], mask[None], None, None, [f"synthetic #{i}"])
    with clock:
        values = acc.compute()
    return values, clock


def reference_metrics(maps: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float) -> dict[str, float]:
    """MVTec AD's algorithm: per-pixel FPR/PRO increments, one global float64 argsort, cumulative sums."""
    total = sum(m.size for m in maps)
    scores = np.empty(total, dtype=np.float64)
    is_normal = np.empty(total, dtype=bool)
    pro_step = np.zeros(total, dtype=np.float64)
    n_regions, at = 0, 0
    for amap, mask in zip(maps, masks, strict=True):
        labels, count = ndimage.label(mask, structure=EIGHT)
        sl = slice(at, at + amap.size)
        scores[sl] = amap.ravel()
        is_normal[sl] = labels.ravel() == 0
        sizes = np.bincount(labels.ravel())
        inv = np.zeros(sizes.size)
        inv[1:] = 1.0 / sizes[1:]
        pro_step[sl] = inv[labels.ravel()]
        n_regions += count
        at += amap.size
    order = np.argsort(scores)[::-1]
    scores = scores[order]
    is_normal = is_normal[order]
    pro_step = pro_step[order]
    del order
    last_of_tie = np.append(scores[1:] != scores[:-1], True)  # one curve point per distinct score
    del scores
    n_neg = int(is_normal.sum())
    fp = is_normal.astype(np.uint32)  # counts fit: fewer than 2**32 pixels
    del is_normal
    np.cumsum(fp, out=fp)
    fp = fp[last_of_tie]
    np.cumsum(pro_step, out=pro_step)
    pro = pro_step[last_of_tie]
    del pro_step
    pro /= n_regions
    tp = np.flatnonzero(last_of_tie)
    del last_of_tie
    tp += 1
    tp -= fp
    fpr = np.concatenate([[0.0], fp / n_neg])
    del fp
    tpr = np.concatenate([[0.0], tp / (total - n_neg)])
    del tp
    pro = np.concatenate([[0.0], pro])
    auroc = float(np.trapezoid(tpr, fpr))
    # Trapezoid up to fpr_limit, the last point linearly interpolated at exactly fpr_limit.
    end = int(np.searchsorted(fpr, fpr_limit, "left"))
    x, y = fpr[:end], pro[:end]
    if end < fpr.size:
        x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
        x = np.append(x, fpr_limit)
        y = np.append(y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return {"aupro": float(np.trapezoid(y, x)) / fpr_limit, "pixel_auroc": auroc}


def run_reference(n: int, size: int, fpr_limit: float) -> tuple[dict[str, float], Clock]:
    maps, masks = [], []
    for amap, mask in synthetic_split(n, size):
        maps.append(amap)
        masks.append(mask)
    with Clock() as clock:
        values = reference_metrics(maps, masks, fpr_limit)
    return values, clock


def measure(fn: Callable, n: int, size: int, fpr_limit: float) -> tuple[dict[str, float], Clock, float]:
    """Run ``fn`` under tracemalloc; returns (values, clock, peak MB)."""
    tracemalloc.start()
    try:
        values, clock = fn(n, size, fpr_limit)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    return values, clock, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 448], help="map sizes (square)")
    parser.add_argument("--n", type=int, default=1725, help="number of maps (MVTec AD test split: 1725)")
    parser.add_argument("--fpr-limit", type=float, default=0.3)
    args = parser.parse_args()
    headers = ["size", "n", "method", "wall s", "CPU s", "peak MB", "aupro", "pixel_auroc"]
    rows = []
    for size in args.sizes:
        ours, c_ours, m_ours = measure(run_ours, args.n, size, args.fpr_limit)
        ref, c_ref, m_ref = measure(run_reference, args.n, size, args.fpr_limit)
        diff = max(abs(ours[k] - ref[k]) for k in ours)
        block = [
            [
                size,
                args.n,
                name,
                f"{c.wall:.2f}",
                f"{c.cpu:.2f}",
                f"{mem:.0f}",
                f"{v['aupro']:.9f}",
                f"{v['pixel_auroc']:.9f}",
            ]
            for name, v, c, mem in (("ours", ours, c_ours, m_ours), ("reference", ref, c_ref, m_ref))
        ]
        block.append(
            [
                size,
                args.n,
                "ratio ref/ours",
                f"{c_ref.wall / c_ours.wall:.1f}x",
                f"{c_ref.cpu / c_ours.cpu:.1f}x",
                f"{m_ref / m_ours:.1f}x",
                f"max |diff| {diff:.1e}",
                "",
            ]
        )
        print(tabulate(block, headers=headers, disable_numparse=True), end="\n\n", flush=True)
        rows += block
    if len(args.sizes) > 1:
        print(tabulate(rows, headers=headers, disable_numparse=True))


if __name__ == "__main__":
    main()
