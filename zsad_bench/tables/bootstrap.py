"""Bootstrap confidence intervals for image AUROC / AP and a paired bootstrap test, from per-image records.

The resampling is stratified by category and, within a category, by label: every replicate draws, for each
category in sorted order and for label 0 then label 1, ``n`` indices with replacement among that category's
``n`` images of that label (sorted by path), with ``numpy.random.default_rng(seed).integers(0, n, size=(B, n))``.
Keeping each category's normal/anomalous counts fixed is pROC's ``stratified=TRUE`` default; it keeps every
replicate's AUROC defined. A replicate's category metric is averaged over the run's seeds (the same images
scored by each seed's model), its mean over the categories where the metric is defined; the interval is the
percentile interval of the replicates (``numpy.percentile``, linear interpolation).

AUROC is computed for all replicates at once from ranks (Mann-Whitney U with tied ranks averaged, equal to
``sklearn.metrics.roc_auc_score``), and AP from one sort per replicate (equal to
``sklearn.metrics.average_precision_score``), because a Python loop of sklearn calls over 1,000 replicates x
15 categories x seeds takes tens of seconds; the tests hold both to sklearn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from zsad_bench.errors import ZsadError

CI_METRICS = ("image_auroc", "image_ap")


@dataclass
class Stratum:
    """One category's images: the score matrix (seeds x images) of its normal and of its anomalous images."""

    category: str
    normal: np.ndarray
    anomalous: np.ndarray


def strata(images: pd.DataFrame, who: str) -> list[Stratum]:
    """Per-category score matrices of one column's per-image records (all its seeds, aligned by image path)."""
    out = []
    seeds = sorted(set(images["seed"]))
    for category, sub in sorted(images.groupby("category"), key=lambda kv: kv[0]):
        parts = []
        for label in (0, 1):
            rows = sub[sub["label"] == label]
            paths = sorted(set(rows["path"]))
            matrix = np.empty((len(seeds), len(paths)))
            for i, seed in enumerate(seeds):
                one = rows[rows["seed"] == seed].drop_duplicates("path").set_index("path")
                if len(one) != len(paths) or len(rows[rows["seed"] == seed]) != len(paths):
                    raise ZsadError(
                        f"{who}: seed {seed} scored other images of '{category}' than the other seeds (or one twice); "
                        "intervals need every seed on the same images"
                    )
                matrix[i] = one.loc[paths, "score"].to_numpy(float)
            parts.append(matrix)
        out.append(Stratum(str(category), parts[0], parts[1]))
    return out


def image_paths(images: pd.DataFrame) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Per category, the sorted paths of its normal and of its anomalous images (to check two runs pair up)."""
    return {
        str(c): tuple(tuple(sorted(set(sub.loc[sub["label"] == lab, "path"]))) for lab in (0, 1))  # type: ignore[misc]
        for c, sub in images.groupby("category")
    }


def _auroc_rows(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """AUROC of each row (last axis: images) from average ranks: (sum of positive ranks - n1(n1+1)/2) / (n1 n0)."""
    n0, n1 = neg.shape[-1], pos.shape[-1]
    ranks = rankdata(np.concatenate([neg, pos], axis=-1), axis=-1)
    return (ranks[..., n0:].sum(axis=-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def _ap_rows(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Average precision of each row, as ``sklearn.metrics.average_precision_score`` (one step per distinct score).

    Scores sorted descending; at the last image of each group of tied scores, the recall step (new true
    positives / n1) times the precision there (true positives / images so far) is summed.
    """
    n1 = pos.shape[-1]
    scores = np.concatenate([neg, pos], axis=-1)
    labels = np.concatenate([np.zeros(neg.shape, bool), np.ones(pos.shape, bool)], axis=-1)
    order = np.argsort(-scores, axis=-1, kind="stable")
    ranked = np.take_along_axis(scores, order, axis=-1)
    tp = np.cumsum(np.take_along_axis(labels, order, axis=-1), axis=-1)
    end = np.ones(ranked.shape, bool)
    end[..., :-1] = ranked[..., :-1] != ranked[..., 1:]
    at_end = np.where(end, tp, 0)
    previous = np.concatenate(
        [np.zeros((*tp.shape[:-1], 1)), np.maximum.accumulate(at_end, axis=-1)[..., :-1]], axis=-1
    )
    seen = np.arange(1, ranked.shape[-1] + 1)
    return np.sum(np.where(end, (tp - previous) * tp / seen, 0.0), axis=-1) / n1


def replicates(groups: list[Stratum], metric: str, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Per category (and ``""`` for the mean over categories), the metric of each of ``n_boot`` replicates.

    Categories lacking normal or anomalous images have no defined metric and are left out of the mean.
    """
    if metric not in CI_METRICS:
        raise ZsadError(f"bootstrap intervals are for {', '.join(CI_METRICS)}, not {metric}")
    rng = np.random.default_rng(seed)
    fn = _auroc_rows if metric == "image_auroc" else _ap_rows
    out: dict[str, np.ndarray] = {}
    for g in groups:
        idx = [rng.integers(0, m.shape[1], size=(n_boot, m.shape[1])) for m in (g.normal, g.anomalous) if m.shape[1]]
        if g.normal.shape[1] == 0 or g.anomalous.shape[1] == 0:
            continue
        neg = g.normal[:, idx[0]]  # seeds x B x n0
        pos = g.anomalous[:, idx[1]]
        out[g.category] = fn(neg, pos).mean(axis=0)
    if out:
        out[""] = np.mean(np.stack(list(out.values())), axis=0)
    return out


def point(groups: list[Stratum], metric: str) -> dict[str, float]:
    """The metric on the images as recorded (no resampling): per category and ``""`` for the mean."""
    fn = _auroc_rows if metric == "image_auroc" else _ap_rows
    out = {
        g.category: float(fn(g.normal[:, None], g.anomalous[:, None]).mean())
        for g in groups
        if g.normal.shape[1] and g.anomalous.shape[1]
    }
    if out:
        out[""] = float(np.mean(list(out.values())))
    return out


def interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval at ``level`` percent."""
    low, high = np.percentile(values, [(100 - level) / 2, 100 - (100 - level) / 2])
    return float(low), float(high)


@dataclass
class PairedResult:
    """Paired bootstrap of the difference in mean image AUROC (A - B) over the same images."""

    a: str
    b: str
    difference: float
    low: float
    high: float
    p_value: float
    n_images: int
    n_categories: int


def paired(
    a: list[Stratum], b: list[Stratum], names: Sequence[str], level: float, n_boot: int, seed: int
) -> PairedResult:
    """Both runs resampled with the same indices; the difference's percentile interval and a two-sided p-value.

    The p-value is the bootstrap test of Efron & Tibshirani (An Introduction to the Bootstrap, ch. 16): the
    replicates centred on the observed difference stand in for the null distribution,
    ``p = (1 + #{|d*_b - d| >= |d|}) / (B + 1)``, where differences within 1e-12 count as equal (a replicate
    whose difference is exactly 0 counts however the float sums round).
    """
    ra = replicates(a, "image_auroc", n_boot, seed)
    rb = replicates(b, "image_auroc", n_boot, seed)
    diff = ra[""] - rb[""]
    observed = point(a, "image_auroc")[""] - point(b, "image_auroc")[""]
    low, high = interval(diff, level)
    p = (1 + int(np.sum(np.abs(diff - observed) >= abs(observed) - 1e-12))) / (n_boot + 1)
    n_images = sum(g.normal.shape[1] + g.anomalous.shape[1] for g in a)
    return PairedResult(names[0], names[1], observed, low, high, p, n_images, len(ra) - 1)
