"""One-call metrics for people who only want the numbers (no harness): arrays or lists in, a float out.

Maps are (H, W) arrays (or an (N, H, W) array, or torch tensors), masks binary arrays of the same
shapes; images in a list may differ in size. Undefined cases (one class only) give NaN with an
``UndefinedMetricWarning``; NaN/inf inputs raise ``ZsadError``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from zsad_bench.errors import ZsadError
from zsad_bench.metrics import _ranking
from zsad_bench.metrics.accumulator import MetricAccumulator, UndefinedMetricWarning, _to_numpy


def _pixel_metric(name: str, maps: Any, masks: Any, **options: Any) -> float:
    if len(maps) != len(masks):
        raise ZsadError(f"{name}: {len(maps)} maps but {len(masks)} masks")
    acc = MetricAccumulator((name,), **options)
    for i, (amap, mask) in enumerate(zip(maps, masks, strict=True)):
        acc.update(_to_numpy(amap, np.float32)[None], _to_numpy(mask, bool)[None], None, None, [f"map #{i}"])
    return acc.compute()[name]


def _image_metric(name: str, scores: Any, labels: Any) -> float:
    acc = MetricAccumulator((name,))
    s, lab = _to_numpy(scores, np.float64).ravel(), _to_numpy(labels, np.int64).ravel()
    acc.update(None, None, s, lab, [f"score #{i}" for i in range(s.size)])
    return acc.compute()[name]


def image_auroc(scores: Any, labels: Any) -> float:
    """AUROC of image ``scores`` (N,) against binary ``labels`` (N,); ties count one half."""
    return _image_metric("image_auroc", scores, labels)


def image_ap(scores: Any, labels: Any) -> float:
    """Average precision of image ``scores`` against binary ``labels`` (as sklearn)."""
    return _image_metric("image_ap", scores, labels)


def pixel_auroc(maps: Any, masks: Any) -> float:
    """AUROC over all pixels of ``maps`` against the binary ``masks``."""
    return _pixel_metric("pixel_auroc", maps, masks)


def pixel_ap(maps: Any, masks: Any) -> float:
    """Average precision over all pixels of ``maps`` against the binary ``masks``."""
    return _pixel_metric("pixel_ap", maps, masks)


def aupro(maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Exact MVTec AD AUPRO: PRO over 8-connected GT regions vs FPR, integrated to ``fpr_limit``, / ``fpr_limit``."""
    return _pixel_metric("aupro", maps, masks, fpr_limit=fpr_limit)


def aupro_cflow(maps: Any, masks: Any, num_thresholds: int = 200, fpr_limit: float = 0.3) -> float:
    """AUPRO as cflow-ad/AnomalyCLIP/SPG: ``num_thresholds`` even thresholds, FPR < ``fpr_limit`` rescaled to [0, 1]."""
    return _pixel_metric("aupro_cflow", maps, masks, fpr_limit=fpr_limit, cflow_thresholds=num_thresholds)


def f1_max(scores: Any, labels: Any) -> float:
    """Best F1 over all thresholds; ``scores``/``labels`` are image scores or (lists of) maps and masks."""
    if isinstance(scores, list | tuple):
        s = np.concatenate([_to_numpy(x, np.float64).ravel() for x in scores])
        lab = np.concatenate([_to_numpy(x, bool).ravel() for x in labels])
    else:
        s, lab = _to_numpy(scores, np.float64).ravel(), _to_numpy(labels, np.int64).ravel().astype(bool)
    if s.shape != lab.shape:
        raise ZsadError(f"f1_max: {s.size} scores but {lab.size} labels")
    if not np.isfinite(s).all():
        raise ZsadError(f"f1_max: score #{int(np.flatnonzero(~np.isfinite(s))[0])} is NaN or inf")
    neg, pos = np.sort(s[~lab]), s[lab]
    if neg.size == 0 or pos.size == 0:
        warnings.warn(
            f"f1_max: {neg.size} negatives and {pos.size} positives; needs both, NaN",
            UndefinedMetricWarning,
            stacklevel=2,
        )
        return float("nan")
    return _ranking.f1_max(_ranking.rank(neg, pos))
