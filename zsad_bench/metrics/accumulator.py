"""Streaming, exact image and pixel metrics: feed batches with ``update``, read them with ``compute``.

Memory: per image only the float32 scores of its normal-GT pixels and of its anomalous-GT pixels
(with the area of the 8-connected region each belongs to) are kept, never the maps themselves:
about 4 bytes per pixel. At ``compute`` the normal-pixel scores are sorted in place; see
``_ranking`` for how all metrics follow from that single sort.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from zsad_bench.data.io import resize_mask
from zsad_bench.errors import ZsadError
from zsad_bench.metrics import _ranking

METRICS: dict[str, str] = {
    "image_auroc": "image AUROC of the image scores (ties count one half)",
    "image_ap": "image average precision (step-wise, as sklearn average_precision_score)",
    "image_f1_max": "image F1 at the best threshold",
    "pixel_auroc": "pixel AUROC over all pixels of all images of the category",
    "pixel_ap": "pixel average precision over all pixels of the category",
    "pixel_f1_max": "pixel F1 at the best threshold",
    "aupro": "exact MVTec AUPRO: 8-connected GT regions, all thresholds, PRO integrated over FPR 0..0.3 / 0.3",
    "aupro_cflow": "AUPRO as cflow/AnomalyCLIP/SPG report it: 200 thresholds, FPR < 0.3 min-max rescaled to [0, 1]",
}
IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro", "aupro_cflow")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_GROWTH = 1.25  # buffer growth factor: at most 25 % slack


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the data given (one class only); it is reported as NaN."""


def _to_numpy(x: Any, dtype: type) -> np.ndarray:
    """NumPy copy-free view of an array-like or a (CPU/GPU, any float) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


class MetricAccumulator:
    """Accumulates image scores and anomaly maps of one category; ``compute`` gives exact metrics.

    ``resolution``: if set, maps (bilinear) and masks (:func:`zsad_bench.data.io.resize_mask`: bilinear
    then > 0.5, as the SPG release) whose size differs are resized to ``resolution x resolution``
    before evaluation. ``label`` (e.g. the category) prefixes warnings.

    ``pixel_labels=False`` says the category has no masks (image labels only): ``update`` takes
    ``masks=None`` (maps, if given, are ignored) and ``compute`` leaves the pixel metrics out of its
    dict altogether, so they are neither reported nor averaged into means (NaN would be).
    """

    def __init__(
        self,
        metrics: Sequence[str] = tuple(METRICS),
        *,
        resolution: int | None = None,
        fpr_limit: float = 0.3,
        cflow_thresholds: int = 200,
        label: str = "",
        pixel_labels: bool = True,
    ) -> None:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ZsadError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
        if not 0.0 < fpr_limit <= 1.0:
            raise ZsadError(f"fpr_limit={fpr_limit}: must be in (0, 1]; the MVTec AD convention is 0.3")
        if resolution is not None and resolution < 1:
            raise ZsadError(f"resolution={resolution}: must be a positive number of pixels")
        self.metrics = tuple(metrics)
        self.resolution = resolution
        self.fpr_limit = fpr_limit
        self.cflow_thresholds = cflow_thresholds
        self.label = label
        self.pixel_labels = pixel_labels
        self.n_images = 0
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._has_maps: bool | None = None
        # float32 scores of normal-GT pixels in one growing buffer (grown in place by realloc, so
        # there is never a second copy); sorted in place by compute().
        self._neg = np.empty(0, dtype=np.float32)
        self._n_neg = 0
        self._neg_sorted = True
        self._pos: list[np.ndarray] = []  # float32 scores of anomalous-GT pixels
        self._pos_area: list[np.ndarray] = []  # int32 area of the GT region of each anomalous pixel
        self._n_regions = 0

    def update(
        self,
        maps: Any | None,
        masks: Any | None,
        scores: Any | None,
        labels: Any | None,
        names: Sequence[str] | None = None,
    ) -> None:
        """Add a batch: maps (B,H,W) float, masks (B,H,W) bool, scores (B,), labels (B,) in {0, 1}.

        ``maps``/``masks`` may be None for image-only evaluation (pixel metrics then read NaN), and
        ``scores``/``labels`` may be None when no image metric was requested. ``names`` (one per image)
        appear in error messages.
        """
        sizes = {len(x) for x in (maps, masks, scores, labels) if x is not None}
        if len(sizes) != 1:
            raise ZsadError(f"update(): maps, masks, scores and labels must have one batch size, got {sorted(sizes)}")
        batch = sizes.pop()
        names = list(names) if names is not None else [f"image #{self.n_images + i}" for i in range(batch)]
        if len(names) != batch:
            raise ZsadError(f"update(): {len(names)} names for a batch of {batch} images")
        if not self.pixel_labels:
            if masks is not None:
                raise ZsadError(f"{names[0]}: masks given, but this accumulator was told its category has none")
            maps = None  # nothing to score them against
        if (scores is None) != (labels is None):
            raise ZsadError("update(): pass scores and labels together (or neither for pixel-only metrics)")
        if scores is None and any(m in IMAGE_METRICS for m in self.metrics):
            raise ZsadError("update(): image metrics were requested but scores/labels are None")
        if (maps is None) != (masks is None):
            raise ZsadError("update(): pass maps and masks together (or neither for image-only metrics)")
        if self._has_maps is not None and self._has_maps != (maps is not None):
            raise ZsadError(f"{names[0]}: some batches have anomaly maps and some do not; give maps for all or none")
        # Validate and convert the whole batch before changing any state.
        if scores is not None:
            scores_np, labels_np = _to_numpy(scores, np.float64), _to_numpy(labels, np.int64)
            self._check_scores(scores_np, labels_np, names)
        # Normal-pixel scores go straight into the buffer past the committed end; they count only
        # once the whole batch has passed validation.
        end, positives = self._n_neg, []
        if maps is not None:
            maps_np, masks_np = _to_numpy(maps, np.float32), _to_numpy(masks, bool)
            for i, name in enumerate(names):
                amap, mask = self._checked(maps_np[i], masks_np[i], name)
                rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
                if rows.size == 0:  # normal image: every pixel is a normal pixel
                    self._reserve(end + amap.size)
                    self._neg[end : end + amap.size] = amap.ravel()
                    end += amap.size
                    continue
                normal = amap[~mask]
                self._reserve(end + normal.size)
                self._neg[end : end + normal.size] = normal
                end += normal.size
                # Regions lie inside the mask's bounding box; labelling only that box is much cheaper.
                box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
                regions, n_regions = ndimage.label(mask[box], structure=_EIGHT_CONNECTED)
                region_of_pixel = regions[mask[box]]
                area = np.bincount(region_of_pixel).astype(np.int32)[region_of_pixel]
                positives.append((amap[box][mask[box]], area, n_regions))
        self._has_maps = maps is not None
        if scores is not None:
            self._scores.append(scores_np.copy())
            self._labels.append(labels_np.copy())
        for pos, area, n_regions in positives:
            self._pos.append(pos)
            self._pos_area.append(area)
            self._n_regions += n_regions
        if end != self._n_neg:
            self._n_neg = end
            self._neg_sorted = False
        self.n_images += batch

    @staticmethod
    def _check_scores(scores: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> None:
        if scores.ndim != 1 or labels.ndim != 1:
            raise ZsadError(f"update(): scores and labels must be 1-D (B,), got {scores.shape} and {labels.shape}")
        for score, lab, name in zip(scores, labels, names, strict=True):
            if not math.isfinite(score):
                raise ZsadError(f"{name}: image score is {score}; fix the method's output (NaN/inf)")
            if lab not in (0, 1):
                raise ZsadError(f"{name}: label {lab} is not 0 (normal) or 1 (anomalous)")

    def _checked(self, amap: np.ndarray, mask: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
        """One image's map and mask, resized to the evaluation resolution and validated."""
        if amap.ndim != 2 or mask.ndim != 2:
            raise ZsadError(f"{name}: anomaly map and mask must be 2-D per image, got {amap.shape} and {mask.shape}")
        if self.resolution is not None:
            amap, mask = self._resize(amap, mask)
        if amap.shape != mask.shape:
            raise ZsadError(
                f"{name}: anomaly map {amap.shape} and mask {mask.shape} differ in size; "
                "resize one of them or set the evaluation resolution"
            )
        if not np.isfinite(amap).all():
            raise ZsadError(f"{name}: anomaly map contains NaN or inf; fix the method's output")
        return amap, mask

    def _resize(self, amap: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = (self.resolution, self.resolution)
        if amap.shape != size:
            import torch
            import torch.nn.functional as F

            t = torch.from_numpy(np.ascontiguousarray(amap))[None, None]
            amap = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
        return amap, resize_mask(mask, self.resolution)

    def compute(self) -> dict[str, float]:
        """Metrics as fractions in [0, 1]; NaN (with an ``UndefinedMetricWarning``) when undefined.

        Without pixel labels (``pixel_labels=False``) the pixel metrics are absent from the dict.
        """
        out: dict[str, float] = {}
        wanted_image = [m for m in self.metrics if m in IMAGE_METRICS]
        wanted_pixel = [m for m in self.metrics if m in PIXEL_METRICS and self.pixel_labels]
        if wanted_image:
            out.update(self._image_metrics(wanted_image))
        if wanted_pixel:
            out.update(self._pixel_metrics(wanted_pixel))
        return {m: out[m] for m in self.metrics if m in out}

    def _warn(self, message: str) -> None:
        prefix = f"{self.label}: " if self.label else ""
        warnings.warn(prefix + message, UndefinedMetricWarning, stacklevel=3)

    def _image_metrics(self, wanted: list[str]) -> dict[str, float]:
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, dtype=np.int64)
        neg, pos = np.sort(scores[labels == 0]), scores[labels == 1]
        if neg.size == 0 or pos.size == 0:
            self._warn(f"{neg.size} normal and {pos.size} anomalous images; image metrics need both, reported NaN")
            return dict.fromkeys(wanted, float("nan"))
        r = _ranking.rank(neg, pos)
        funcs = {"image_auroc": _ranking.auroc, "image_ap": _ranking.average_precision, "image_f1_max": _ranking.f1_max}
        return {m: funcs[m](r) for m in wanted}

    def _reserve(self, size: int) -> None:
        """Grow the normal-pixel buffer in place (realloc) to hold at least ``size`` values."""
        if size > self._neg.size:
            self._neg.resize(max(size, int(self._neg.size * _GROWTH)), refcheck=False)

    def _sorted_negatives(self) -> np.ndarray:
        """The normal-pixel scores, sorted in place (a view of the buffer)."""
        neg = self._neg[: self._n_neg]
        if not self._neg_sorted:
            neg.sort()
            self._neg_sorted = True
        return neg

    def _pixel_metrics(self, wanted: list[str]) -> dict[str, float]:
        if not self._has_maps:
            self._warn("no anomaly maps were given; pixel metrics reported NaN")
            return dict.fromkeys(wanted, float("nan"))
        neg = self._sorted_negatives()
        pos = np.concatenate(self._pos) if self._pos else np.zeros(0, dtype=np.float32)
        if neg.size == 0 or pos.size == 0:
            self._warn(f"{neg.size} normal and {pos.size} anomalous pixels; pixel metrics need both, reported NaN")
            return dict.fromkeys(wanted, float("nan"))
        weights = None
        if "aupro" in wanted or "aupro_cflow" in wanted:
            weights = 1.0 / (np.concatenate(self._pos_area).astype(np.float64) * self._n_regions)
        r = _ranking.rank(neg, pos, weights)
        del pos, weights
        out: dict[str, float] = {}
        for m in wanted:
            if m == "pixel_auroc":
                out[m] = _ranking.auroc(r)
            elif m == "pixel_ap":
                out[m] = _ranking.average_precision(r)
            elif m == "pixel_f1_max":
                out[m] = _ranking.f1_max(r)
            elif m == "aupro":
                out[m] = _ranking.aupro_exact(r, neg, self.fpr_limit)
            else:
                out[m] = _ranking.aupro_cflow(r, neg, self.cflow_thresholds, self.fpr_limit)
                if math.isnan(out[m]):
                    self._warn("all map values are equal; aupro_cflow has no thresholds, reported NaN")
        return out


def category_mean(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean over categories with equal weight, per metric; NaN categories are left out (all NaN -> NaN)."""
    names = list(dict.fromkeys(m for values in per_category.values() for m in values))
    out: dict[str, float] = {}
    for m in names:
        vals = [v[m] for v in per_category.values() if m in v and math.isfinite(v[m])]
        out[m] = float(np.mean(vals)) if vals else float("nan")
    return out
