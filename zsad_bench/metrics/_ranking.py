"""Exact threshold-free metrics from a sorted array of negative scores and the positive scores.

Every metric here (AUROC, AP, F1-max, both AUPRO variants) only needs, for each *distinct positive
value* ``u``, how many negatives lie strictly below ``u`` and how many equal it. Sorting the negatives
once (float32, in place) and searching the few positives in them replaces the usual global argsort of
all pixels with labels and weights attached: ties are handled exactly and no index array is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_SEARCH_GROUP = 16384  # needles per bounded search: the haystack slice stays cache-resident


def sorted_search(hay: np.ndarray, needles: np.ndarray, side: str) -> np.ndarray:
    """``np.searchsorted(hay, needles, side)`` for sorted ``needles``; faster on huge ``hay``.

    Consecutive groups of needles are searched in the haystack slice that bounds them, which keeps
    the binary searches inside the cache.
    """
    out = np.empty(needles.size, dtype=np.int64)
    if needles.size == 0:
        return out
    starts = np.arange(0, needles.size, _SEARCH_GROUP)
    lows = np.searchsorted(hay, needles[starts], side)
    highs = np.append(lows[1:], hay.size)
    for start, low, high in zip(starts.tolist(), lows.tolist(), highs.tolist(), strict=True):
        stop = start + _SEARCH_GROUP
        out[start:stop] = np.searchsorted(hay[low:high], needles[start:stop], side)
        out[start:stop] += low
    return out


@dataclass(frozen=True)
class Ranked:
    """Distinct positive values (ascending) with their multiplicities and where the negatives fall.

    ``weights`` sums a per-positive weight at each value (the PRO weights ``1 / region area``,
    already divided by the number of regions; plain counts / n_pos when no weights are given).
    """

    values: np.ndarray  # distinct positive values, ascending
    counts: np.ndarray  # int64, positives at each value
    weights: np.ndarray  # float64, weight at each value; sums to 1
    neg_lt: np.ndarray  # int64, negatives strictly below each value
    neg_le: np.ndarray  # int64, negatives at or below each value
    n_neg: int

    @property
    def n_pos(self) -> int:
        return int(self.counts.sum())


def rank(neg_sorted: np.ndarray, pos: np.ndarray, pos_weights: np.ndarray | None = None) -> Ranked:
    """Group ``pos`` by value and locate each value among ``neg_sorted`` (ascending, same dtype)."""
    order = np.argsort(pos)
    values_all = pos[order]
    if pos_weights is None:
        w_all = np.full(values_all.size, 1.0 / max(values_all.size, 1))
    else:
        w_all = np.asarray(pos_weights, dtype=np.float64)[order]
    first = np.flatnonzero(np.r_[True, values_all[1:] != values_all[:-1]]) if values_all.size else order[:0]
    values = values_all[first]
    counts = np.diff(np.append(first, values_all.size)).astype(np.int64)
    weights = np.add.reduceat(w_all, first) if values.size else np.zeros(0)
    neg_lt = sorted_search(neg_sorted, values, "left")
    neg_le = neg_lt.copy()  # right insertion points differ only where a negative equals the value
    if neg_sorted.size:
        tied = np.flatnonzero(neg_sorted[np.minimum(neg_lt, neg_sorted.size - 1)] == values)
        neg_le[tied] = sorted_search(neg_sorted, values[tied], "right")
    return Ranked(values, counts, weights, neg_lt, neg_le, int(neg_sorted.size))


def auroc(r: Ranked) -> float:
    """Area under the ROC curve; ties count one half (Mann-Whitney U / (n_pos n_neg))."""
    below = r.neg_lt + 0.5 * (r.neg_le - r.neg_lt)
    return float(np.dot(r.counts.astype(np.float64), below) / (r.n_pos * r.n_neg))


def _tp_fp(r: Ranked) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives when predicting ``score >= value`` for each distinct positive value."""
    tp = np.cumsum(r.counts[::-1])[::-1]
    fp = r.n_neg - r.neg_lt
    return tp, fp


def average_precision(r: Ranked) -> float:
    """Step-wise AP (sum of precision times recall increments), as ``sklearn.average_precision_score``."""
    tp, fp = _tp_fp(r)
    return float(np.dot(r.counts / r.n_pos, tp / (tp + fp)))


def f1_max(r: Ranked) -> float:
    """Best F1 over all thresholds (only thresholds at positive values can be optimal)."""
    tp, fp = _tp_fp(r)
    return float(np.max(2.0 * tp / (tp + fp + r.n_pos)))


def aupro_exact(r: Ranked, neg_sorted: np.ndarray, fpr_limit: float) -> float:
    """Normalised area under PRO(FPR) on [0, fpr_limit] over all distinct thresholds (MVTec AD).

    Sweeping the threshold down, each distinct value moves the curve along one straight segment
    (its negatives widen the FPR, its positives raise the PRO). Summing trapezoids gives
    ``(1/N) * sum over negatives v of [W(> v) + W(= v) / 2]``, computed per positive value instead;
    the segment that crosses ``fpr_limit`` is cut there by linear interpolation.
    """
    n = r.n_neg
    budget = fpr_limit * n  # the FPR limit counted in negatives
    full = int(np.floor(budget))
    if full >= n:  # the whole curve lies inside the limit
        below_in = r.neg_lt.astype(np.float64)
        ties_in = (r.neg_le - r.neg_lt).astype(np.float64)
        area = float(np.dot(r.weights, below_in + 0.5 * ties_in))
        return area / n / fpr_limit
    crossing = neg_sorted[n - 1 - full]  # the value whose tie group contains the limit
    first_above = int(np.searchsorted(neg_sorted, crossing, "right"))
    n_above = n - first_above  # negatives strictly above the crossing value
    n_cross = first_above - int(np.searchsorted(neg_sorted, crossing, "left"))
    above = r.values > crossing
    below_in = np.maximum(r.neg_lt - first_above, 0).astype(np.float64)
    ties_in = np.where(above, r.neg_le - r.neg_lt, 0).astype(np.float64)
    area = float(np.dot(r.weights, below_in + 0.5 * ties_in)) / n
    # Partial segment of the crossing tie group, from FPR n_above/n up to the limit.
    idx = int(np.searchsorted(r.values, crossing, "left"))
    w_before = float(r.weights[above].sum())
    w_cross = float(r.weights[idx]) if idx < r.values.size and r.values[idx] == crossing else 0.0
    x = (budget - n_above) / n
    area += x * w_before + 0.5 * (w_cross / (n_cross / n)) * x * x
    return area / fpr_limit


def aupro_cflow(r: Ranked, neg_sorted: np.ndarray, num_thresholds: int, fpr_limit: float) -> float:
    """AUPRO as cflow-ad / AnomalyCLIP / the SPG release compute it.

    Thresholds ``np.arange(min, max, (max - min) / num_thresholds)`` in the maps' dtype, prediction
    ``score > t``; keep points with FPR < ``fpr_limit``, min-max rescale those FPRs to [0, 1]
    (``+ 1e-12`` in the denominator, as the release's fast version) and integrate with trapezoids.
    Constant maps (no thresholds) give NaN; fewer than two kept points give 0.0 (a zero-width curve).
    """
    lo = min(neg_sorted[0], r.values[0])
    hi = max(neg_sorted[-1], r.values[-1])
    if hi == lo:
        return float("nan")
    thresholds = np.arange(lo, hi, (hi - lo) / num_thresholds)
    fpr = (neg_sorted.size - np.searchsorted(neg_sorted, thresholds, "right")) / neg_sorted.size
    w_tail = np.append(np.cumsum(r.weights[::-1])[::-1], 0.0)  # W(>= values[i]); 0 past the end
    pro = w_tail[np.searchsorted(r.values, thresholds, "right")]
    keep = fpr < fpr_limit
    fpr, pro = fpr[keep], pro[keep]
    if fpr.size < 2:
        return 0.0
    x = (fpr - fpr.min()) / (fpr.max() - fpr.min() + 1e-12)
    return float(abs(np.trapezoid(pro, x)))
