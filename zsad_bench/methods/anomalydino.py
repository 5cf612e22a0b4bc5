"""AnomalyDINO: few-shot patch kNN against the patch features of k normal reference images.

Damm, Laszkiewicz, Lederer, Fischer, "AnomalyDINO: Boosting Patch-based Few-shot Anomaly Detection
with DINOv2", WACV 2025; official code github.com/dammsi/AnomalyDINO (``src/detection.py``,
``src/utils.py``, ``src/post_eval.py``, ``src/backbones.py``).

What the official code does and this plugin reproduces:

* memory bank = every patch token of the k reference images, L2-normalised;
* patch anomaly score = cosine distance ``1 - cos`` to the nearest bank patch (faiss ``L2_normalized``
  metric: squared L2 of unit vectors / 2); with ``knn_neighbors > 1`` the mean over the nearest ones;
* image score = mean of the top 1% patch distances (``mean_top1p``: the top ``int(0.01 N)`` patches,
  or the maximum when that is 0), computed over all patches (masked-out ones count as 0);
* anomaly map = patch grid bilinearly resized to the image, then Gaussian-smoothed with sigma 4
  (``scipy.ndimage.gaussian_filter``, ``reflect`` border, truncate 4);
* optional zero-shot masking of test patches (``masking``): first principal component of the test
  image's own patch tokens thresholded at 10 (flipped when the centre crop is mostly discarded), then
  3x3 dilation and 3x3 closing; reference images are never masked (``mask_ref_images=False``).

Differences, by necessity of the harness: the map is produced at the square input size S rather than
the original image resolution (the runner resizes it for metrics); images are resized to S x S instead
of "smaller edge 448 + crop"; the paper's default backbone is DINOv2 ViT-S/14, whereas this
harness's ``dinov2`` backbone is ViT-L/14 (the registry has no ViT-S); the backbone's default feature
layer is used (for ``dinov2`` the raw last block; official: the last block after the final LayerNorm).
The rotation augmentation of reference images ("agnostic" preprocessing) needs the images and is not
done; masking is off by default because the official per-object masking table is specific to MVTec AD
categories and its threshold to DINOv2 token scale. Runs on any backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from zsad_bench.backbones.base import Backbone
from zsad_bench.detector import Batch, DataSource, Detector, FitContext, LearningType, Prediction, register_method
from zsad_bench.errors import ZsadError
from zsad_bench.postprocess import gaussian_smooth


def cosine_knn_distance(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = 4096) -> torch.Tensor:
    """Mean cosine distance ``1 - cos`` of each query row to its ``k`` nearest rows of ``bank`` (both any scale)."""
    q = F.normalize(queries.float(), dim=-1)
    b = F.normalize(bank.float(), dim=-1)
    k = min(k, b.shape[0])
    out = []
    for start in range(0, q.shape[0], chunk):
        sim = q[start : start + chunk] @ b.T
        out.append((1.0 - sim.topk(k, dim=1).values).mean(dim=1))
    return torch.cat(out).clamp_min(0.0)


def mean_top_fraction(values: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """Per row: mean of the top ``int(fraction * n)`` values, or the maximum when that count is 0."""
    n = int(values.shape[-1] * fraction)
    if n == 0:
        return values.max(dim=-1).values
    return values.topk(n, dim=-1).values.mean(dim=-1)


def _binary_dilate(mask: torch.Tensor, size: int) -> torch.Tensor:
    return F.max_pool2d(mask[:, None].float(), size, stride=1, padding=size // 2)[:, 0] > 0.5


def foreground_mask(grid: torch.Tensor, threshold: float = 10.0, border: float = 0.2, kernel: int = 3) -> torch.Tensor:
    """AnomalyDINO's zero-shot patch mask for one ``(h, w, C)`` token grid: PCA-1 > threshold, dilated, closed."""
    h, w, c = grid.shape
    tokens = grid.reshape(-1, c).double()
    centered = tokens - tokens.mean(dim=0)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    pc = (centered @ vh[0]).float().view(h, w)
    mask = pc > threshold
    centre = mask[int(h * border) : int(h * (1 - border)), int(w * border) : int(w * (1 - border))]
    if centre.sum() <= centre.numel() * 0.35:
        mask = -pc > threshold
    dilated = _binary_dilate(mask[None], kernel)
    closed = ~_binary_dilate(~_binary_dilate(dilated, kernel), kernel)  # closing = dilation then erosion
    return closed[0]


@register_method
class AnomalyDINO(Detector):
    """Few-shot kNN on patch tokens (see module docstring)."""

    name = "anomalydino"
    display_name = "AnomalyDINO"
    learning_type = LearningType.FEW_SHOT
    paper = "Damm et al., AnomalyDINO, WACV 2025 (github.com/dammsi/AnomalyDINO)"
    default_backbone = "dinov2"
    inference_options = ("knn_neighbors", "top_fraction", "sigma", "masking", "mask_threshold")

    @dataclass
    class Config:
        knn_neighbors: int = 1  # nearest bank patches averaged per test patch
        top_fraction: float = 0.01  # image score: mean of this top fraction of patch distances
        sigma: float = 4.0  # Gaussian smoothing of the upsampled map (pixels at the input size)
        masking: bool = False  # zero-shot PCA masking of test patches (official per-object table: off/on)
        mask_threshold: float = 10.0  # PCA-1 threshold of the masking (DINOv2 token scale)

    def __init__(self, backbone: Backbone, config: Config | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(backbone, config, device)
        cfg = self.config
        if cfg.knn_neighbors < 1:
            raise ZsadError(f"option anomalydino.knn_neighbors={cfg.knn_neighbors}: use an integer >= 1")
        if not 0.0 < cfg.top_fraction <= 1.0:
            raise ZsadError(f"option anomalydino.top_fraction={cfg.top_fraction}: use a value in (0, 1]")
        if cfg.sigma < 0:
            raise ZsadError(f"option anomalydino.sigma={cfg.sigma}: use a value >= 0")
        self.bank: torch.Tensor | None = None

    def fit(self, data: DataSource, ctx: FitContext) -> None:
        """Memory bank: all patch tokens of the k normal reference images."""
        parts = []
        for batch in data.batches(8):
            if batch.features is None:
                raise ZsadError("anomalydino: the reference data source carries no features")
            grid = batch.features.layer()
            parts.append(grid.reshape(-1, grid.shape[-1]).float())
        if not parts:
            raise ZsadError("anomalydino: no reference images; pass --shots 1 or more")
        self.bank = F.normalize(torch.cat(parts).to(self.device), dim=-1)

    def patch_distances(self, grid: torch.Tensor) -> torch.Tensor:
        """Per-patch distances ``(B, h, w)`` of token grids ``(B, h, w, C)``; masked patches are 0."""
        if self.bank is None:
            raise ZsadError("anomalydino: predict called before fit (no memory bank)")
        b, h, w, c = grid.shape
        grid = grid.to(self.device).float()
        dist = cosine_knn_distance(grid.reshape(-1, c), self.bank, self.config.knn_neighbors).view(b, h, w)
        if self.config.masking:
            keep = torch.stack([foreground_mask(g, self.config.mask_threshold) for g in grid])
            dist = dist * keep
        return dist

    def predict(self, batch: Batch) -> Prediction:
        if batch.features is None:
            raise ZsadError("anomalydino: batch carries no features")
        dist = self.patch_distances(batch.features.layer())
        scores = mean_top_fraction(dist.flatten(1), self.config.top_fraction)
        size = self.backbone.image_size
        maps = F.interpolate(dist[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        return Prediction(gaussian_smooth(maps, self.config.sigma), scores)

    def state_dict(self) -> dict[str, Any]:
        return {"bank": None if self.bank is None else self.bank.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "bank" not in state or state["bank"] is None:
            raise ZsadError("anomalydino: checkpoint holds no memory bank; delete it to refit")
        self.bank = state["bank"].to(self.device).float()

    def summary(self) -> dict[str, float]:
        return {} if self.bank is None else {"bank_patches": float(self.bank.shape[0])}
