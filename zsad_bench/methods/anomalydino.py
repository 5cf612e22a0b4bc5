"""AnomalyDINO: few-shot patch kNN against the patch features of k normal reference images.

Damm, Laszkiewicz, Lederer, Fischer, "AnomalyDINO: Boosting Patch-based Few-shot Anomaly Detection
with DINOv2", WACV 2025; official code github.com/dammsi/AnomalyDINO (``src/detection.py``,
``src/utils.py``, ``src/post_eval.py``, ``src/backbones.py``).

What the official code does and this plugin reproduces:

* backbone and input: DINOv2 ViT-S/14 (``run_anomalydino.py:32``, ``dinov2-vits14`` here), images resized
  so the shorter edge is 448 (``--resolution 448``, ``run_anomalydino.py:37``; ``src/backbones.py:103``)
  and cropped to a multiple of 14; patch tokens of the last block after the final LayerNorm
  (``get_intermediate_layers(x)[0]``, ``src/backbones.py:132``; layer ``"12:norm"`` here);
* memory bank = every patch token of the k reference images, each reference augmented by its 8
  rotations 0, 45, ..., 315 degrees (the default "agnostic" preprocessing: ``rotation_default`` True for
  every object, ``src/utils.py:7-22`` and ``:136-137``; ``src/detection.py:86-97``); ``rotate`` here;
* patch anomaly score = cosine distance ``1 - cos`` to the nearest bank patch (faiss ``L2_normalized``
  metric: squared L2 of unit vectors / 2, ``src/detection.py:168-173``); with ``knn_neighbors > 1`` the
  mean over the nearest ones;
* zero-shot masking of test patches (``masking``): first principal component of the test image's own
  patch tokens thresholded at 10 (flipped when the centre crop is mostly discarded), then 3x3 dilation
  and 3x3 closing (``src/backbones.py:159-174``); reference images are never masked
  (``mask_ref_images=False``); masked patches score 0. Which categories are masked is the official
  table (``src/utils.py:97-116``: MVTec AD capsule, hazelnut, pill, screw, toothbrush; ``:159-163``: every
  VisA category), applied from the target by ``dataset_defaults`` ("mvtec-table" / "on");
* image score = mean of the top 1% patch distances (``mean_top1p``, ``src/post_eval.py:293-297``: the top
  ``int(0.01 N)`` patches, or the maximum when that is 0), over all patches (masked ones count as 0);
* anomaly map = patch grid bilinearly resized to the original image resolution, then Gaussian-smoothed
  with sigma 4 there (``scipy.ndimage.gaussian_filter``, ``reflect`` border, truncate 4;
  ``src/utils.py:25-30``). With ``smooth_at="original"`` this plugin does exactly that (the original
  size is read from the image header) and then resizes the smooth map (antialiased) to the input size S
  the harness works at; ``smooth_at="input"`` smooths at S instead.

Differences, by necessity of the harness: images are resized to S x S (for square images, e.g. MVTec
AD, the same as "shorter edge 448"; VisA's 3:2 images lose their aspect ratio); the rotations are done
on the preprocessed S x S tensor (bilinear, reflected border, about the exact image centre) where the
official rotates the original image with OpenCV (``BORDER_REFLECT_101``, centre ``(w/2, h/2)``) before
resizing. On backbones without final-normed layers (``effnet-lite0``, or before ``capabilities`` are
declared) the backbone's default layer is used. Runs on any backbone; the backbone runs inside
``fit``/``predict`` (``needs_images``) because the rotated references need images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image

from zsad_bench.backbones.base import Backbone
from zsad_bench.data.records import Sample
from zsad_bench.detector import Batch, DataSource, Detector, FitContext, LearningType, Prediction, register_method
from zsad_bench.errors import DataError, ZsadError
from zsad_bench.postprocess import gaussian_smooth
from zsad_bench.presets import PaperSetting

ROTATIONS: tuple[int, ...] = (0, 45, 90, 135, 180, 225, 270, 315)  # official augment_image angles
# Official masking table for MVTec AD (src/utils.py:101-116): the objects masked under "agnostic".
MVTEC_MASKED: frozenset[str] = frozenset({"capsule", "hazelnut", "pill", "screw", "toothbrush"})


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


def rotate_images(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """``(B, C, H, W)`` images rotated counter-clockwise (as displayed) about their centre; bilinear, reflected border.

    Written with ``affine_grid``/``grid_sample`` rather than ``torchvision.transforms.functional.rotate``
    because the latter fills the corners with a constant, where the official OpenCV call reflects.
    """
    if degrees % 360 == 0:
        return images
    b, _, h, w = images.shape
    t = math.radians(degrees)
    cos, sin = math.cos(t), math.sin(t)
    # y points down: a counter-clockwise turn maps p to [[c, s], [-s, c]] p; each output pixel samples the
    # input at the inverse [[c, -s], [s, c]] p (in normalised coordinates, corrected for the aspect ratio)
    theta = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=images.dtype, device=images.device)
    grid = F.affine_grid(theta.expand(b, 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def original_size(sample: Sample) -> tuple[int, int]:
    """``(height, width)`` of a sample's image file, from its header."""
    try:
        with Image.open(sample.image_path) as img:
            width, height = img.size
    except OSError as err:
        raise DataError(f"{sample.image_path}: cannot read the image size ({err}); check the file") from None
    return height, width


@register_method
class AnomalyDINO(Detector):
    """Few-shot kNN on patch tokens (see module docstring)."""

    name = "anomalydino"
    display_name = "AnomalyDINO"
    learning_type = LearningType.FEW_SHOT
    paper = "Damm et al., AnomalyDINO, WACV 2025 (github.com/dammsi/AnomalyDINO)"
    default_backbone = "dinov2-vits14"
    needs_images = True
    paper_setting: ClassVar[PaperSetting] = PaperSetting(
        "dinov2-vits14", 448, note="DINOv2 ViT-S/14 at 448 px, last block after the final norm, 8 rotations"
    )
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "mvtec": {"masking": "mvtec-table"},
        "visa": {"masking": "on"},
    }

    @dataclass
    class Config:
        knn_neighbors: int = field(
            default=1, metadata={"inference": True, "ge": 1, "help": "nearest bank patches averaged per test patch"}
        )
        top_fraction: float = field(
            default=0.01, metadata={"inference": True, "gt": 0.0, "le": 1.0, "help": "image score: top fraction mean"}
        )
        sigma: float = field(default=4.0, metadata={"inference": True, "ge": 0.0, "help": "Gaussian sigma (pixels)"})
        smooth_at: str = field(
            default="original",
            metadata={"inference": True, "choices": ("original", "input"), "help": "resolution the map is smoothed at"},
        )
        masking: str = field(
            default="off",
            metadata={
                "inference": True,
                "choices": ("off", "on", "mvtec-table"),
                "help": "zero-shot PCA masking of test patches (mvtec-table: the official per-object table)",
            },
        )
        mask_threshold: float = field(
            default=10.0, metadata={"inference": True, "help": "PCA-1 threshold of the masking (DINOv2 token scale)"}
        )
        rotate: bool = field(default=True, metadata={"help": "add the 8 rotations of every reference to the bank"})

    def __init__(self, backbone: Backbone, config: Config | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(backbone, config, device)
        cfg = self.config
        if cfg.knn_neighbors < 1:
            raise ZsadError(f"option anomalydino.knn_neighbors={cfg.knn_neighbors}: use an integer >= 1")
        if not 0.0 < cfg.top_fraction <= 1.0:
            raise ZsadError(f"option anomalydino.top_fraction={cfg.top_fraction}: use a value in (0, 1]")
        if cfg.sigma < 0:
            raise ZsadError(f"option anomalydino.sigma={cfg.sigma}: use a value >= 0")
        if cfg.masking not in ("off", "on", "mvtec-table"):
            raise ZsadError(f"option anomalydino.masking={cfg.masking}: use off, on or mvtec-table")
        if cfg.smooth_at not in ("original", "input"):
            raise ZsadError(f"option anomalydino.smooth_at={cfg.smooth_at}: use original or input")
        self.bank: torch.Tensor | None = None

    @classmethod
    def layers_for(cls, capabilities: Any) -> tuple[str, ...] | None:
        """The last block after the final norm where the backbone offers it, else None (default layer)."""
        num_blocks = getattr(capabilities, "num_blocks", None)
        if not num_blocks or not getattr(capabilities, "normed_layers", False):
            return None
        return (f"{num_blocks}:norm",)

    def grid(self, images: torch.Tensor) -> torch.Tensor:
        """Token grid ``(B, h, w, C)`` of preprocessed images, of the layer :meth:`layers_for` picks."""
        layers = self.layers_for(getattr(self.backbone, "capabilities", None))
        with torch.no_grad():
            feats = self.backbone.forward_features(images.to(self.device), layers)
        return feats.layer(layers[0] if layers else None).float()

    def fit(self, data: DataSource, ctx: FitContext) -> None:
        """Memory bank: all patch tokens of the k normal references and (``rotate``) of their 8 rotations."""
        angles = ROTATIONS if self.config.rotate else (0,)
        parts = []
        for batch in data.batches(8):
            images = _images(batch)
            for angle in angles:
                grid = self.grid(rotate_images(images, angle))
                parts.append(grid.reshape(-1, grid.shape[-1]))
        if not parts:
            raise ZsadError("anomalydino: no reference images; pass --shots 1 or more")
        self.bank = F.normalize(torch.cat(parts).to(self.device), dim=-1)

    def masked(self, category: str) -> bool:
        """Whether test images of ``category`` are masked (``masking``; "mvtec-table" per the official table)."""
        if self.config.masking == "mvtec-table":
            return category in MVTEC_MASKED
        return self.config.masking == "on"

    def patch_distances(self, grid: torch.Tensor, categories: Sequence[str] | None = None) -> torch.Tensor:
        """Per-patch distances ``(B, h, w)`` of token grids ``(B, h, w, C)``; masked patches are 0."""
        if self.bank is None:
            raise ZsadError("anomalydino: predict called before fit (no memory bank)")
        b, h, w, c = grid.shape
        grid = grid.to(self.device).float()
        dist = cosine_knn_distance(grid.reshape(-1, c), self.bank, self.config.knn_neighbors).view(b, h, w)
        categories = categories if categories is not None else [""] * b
        for i, category in enumerate(categories):
            if self.masked(category):
                dist[i] = dist[i] * foreground_mask(grid[i], self.config.mask_threshold)
        return dist

    def anomaly_maps(self, dist: torch.Tensor, samples: Sequence[Sample]) -> torch.Tensor:
        """Maps ``(B, S, S)``: bilinear upsampling and Gaussian smoothing, at the original size or at S."""
        size = self.backbone.image_size
        if self.config.smooth_at == "input":
            maps = F.interpolate(dist[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            return gaussian_smooth(maps, self.config.sigma)
        out = []
        for d, sample in zip(dist, samples, strict=True):
            full = F.interpolate(d[None, None], size=original_size(sample), mode="bilinear", align_corners=False)
            smooth = gaussian_smooth(full[:, 0], self.config.sigma)
            out.append(F.interpolate(smooth[:, None], size=(size, size), mode="bilinear", antialias=True)[0, 0])
        return torch.stack(out)

    def predict(self, batch: Batch) -> Prediction:
        dist = self.patch_distances(self.grid(_images(batch)), [s.category for s in batch.samples])
        scores = mean_top_fraction(dist.flatten(1), self.config.top_fraction)
        return Prediction(self.anomaly_maps(dist, batch.samples), scores)

    def state_dict(self) -> dict[str, Any]:
        return {"bank": None if self.bank is None else self.bank.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "bank" not in state or state["bank"] is None:
            raise ZsadError("anomalydino: checkpoint holds no memory bank; delete it to refit")
        self.bank = state["bank"].to(self.device).float()

    def summary(self) -> dict[str, float]:
        return {} if self.bank is None else {"bank_patches": float(self.bank.shape[0])}


def _images(batch: Batch) -> torch.Tensor:
    if batch.images is None:
        raise ZsadError("anomalydino: batch carries no images (the method needs_images)")
    return batch.images
