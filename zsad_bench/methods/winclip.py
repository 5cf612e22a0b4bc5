"""WinCLIP: training-free zero-shot anomaly classification and segmentation with CLIP.

Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation", CVPR 2023
(arXiv 2303.14814). Follows the anomalib re-implementation (openvinotoolkit/anomalib,
``src/anomalib/models/image/winclip``), the reference the paper's authors did not release code for:

* compositional prompt ensemble: 7 normal and 4 anomalous state words x 21 templates, the class
  embedding is the mean of its prompt embeddings;
* image score: softmax over (normal, anomalous) of cosine similarities / 0.07, anomalous entry;
* windows of 2x2 and 3x3 patches (stride 1): the CLS token plus the window's position-embedded patch
  tokens go through the whole vision transformer, the pooled embedding is scored like the image;
* each patch takes the harmonic mean of the scores of the windows covering it, and the scales
  (image score broadcast, 2x2, 3x3) are fused by another harmonic mean; bilinear upsampling to S.

The helpers for running an OpenCLIP vision tower by hand (:func:`clip_model`, :func:`clip_embed`,
:func:`clip_pool`) are shared with the AnomalyCLIP and VisualAD plugins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zsad_bench.backbones.base import Backbone
from zsad_bench.detector import Batch, Detector, LearningType, Prediction, register_method
from zsad_bench.errors import ZsadError

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


def object_name(category: str) -> str:
    """The class word used in prompts: the category with underscores as spaces (``metal_nut`` -> ``metal nut``)."""
    return category.replace("_", " ").strip() or "object"


def prompt_ensemble(name: str) -> tuple[list[str], list[str]]:
    """Normal and anomalous prompts for ``name``: every state x every template (states outer)."""
    normal = [t.format(s.format(name)) for s in NORMAL_STATES for t in TEMPLATES]
    anomalous = [t.format(s.format(name)) for s in ANOMALOUS_STATES for t in TEMPLATES]
    return normal, anomalous


def clip_model(backbone: Backbone, method: str) -> nn.Module:
    """The OpenCLIP model behind ``backbone`` (``backbone.model`` with a ViT ``visual`` tower)."""
    model = getattr(backbone, "model", None)
    visual = getattr(model, "visual", None)
    if visual is None or not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        raise ZsadError(f"method '{method}' needs an OpenCLIP ViT backbone; use --backbone openclip")
    if not getattr(visual.transformer, "batch_first", False):
        raise ZsadError(f"method '{method}' needs batch-first OpenCLIP transformers; upgrade open_clip_torch")
    return model


def clip_embed(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Token sequence ``(B, 1+N, C)`` entering the first block: patch embedding, CLS, positions, ``ln_pre``.

    The positional table must match the grid (the ``openclip`` backbone resizes it to its input size).
    """
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    b, c, gh, gw = x.shape
    x = x.reshape(b, c, gh * gw).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(b, 1, c)
    return visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))


def clip_pool(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Image embedding in the joint space from the last block's tokens ``(B, L, C)`` (``ln_post``, pool, ``proj``)."""
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled


def window_indices(grid: int, k: int) -> torch.Tensor:
    """Patch indices ``(n_windows, k*k)`` of every ``k x k`` window (stride 1) on a ``grid x grid`` map, row-major."""
    if k > grid:
        raise ZsadError(f"winclip: window size {k} exceeds the {grid}x{grid} patch grid; lower 'scales'")
    idx = torch.arange(grid * grid).reshape(grid, grid)
    wins = idx.unfold(0, k, 1).unfold(1, k, 1)  # (g-k+1, g-k+1, k, k)
    return wins.reshape(-1, k * k)


def harmonic_aggregation(window_scores: torch.Tensor, grid: int, k: int) -> torch.Tensor:
    """Per-patch harmonic mean ``(B, grid, grid)`` of the scores ``(B, n_windows)`` of the k x k windows covering it.

    Windows are ordered as :func:`window_indices` orders them (top-left corner, row-major).
    """
    n = grid - k + 1
    inv = (1.0 / window_scores).reshape(-1, 1, n, n)
    ones = torch.ones(1, 1, k, k, dtype=inv.dtype, device=inv.device)
    total = F.conv_transpose2d(inv, ones)
    count = F.conv_transpose2d(torch.ones_like(inv[:1]), ones)
    return (count / total)[:, 0]


def anomaly_probability(embeddings: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax over (normal, anomalous) of cosine similarity / temperature; the anomalous entry.

    ``embeddings`` ``(..., D)``, ``text`` ``(2, D)`` or per-leading-index ``(..., 2, D)`` broadcastable.
    """
    e = F.normalize(embeddings, dim=-1)
    t = F.normalize(text, dim=-1)
    logits = torch.einsum("...d,...kd->...k", e, t.expand(*e.shape[:-1], *t.shape[-2:]))
    return (logits / temperature).softmax(dim=-1)[..., 1]


@register_method
class WinCLIP(Detector):
    """Training-free CLIP scoring of the whole image and of 2x2 / 3x3 patch windows against prompt ensembles."""

    name = "winclip"
    display_name = "WinCLIP"
    learning_type = LearningType.TRAINING_FREE
    paper = "Jeong et al., WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation, CVPR 2023"
    # Paper/anomalib: OpenCLIP ViT-B-16-plus-240 (laion400m_e31) at 240 px. The shipped ``openclip`` backbone is
    # OpenAI ViT-L/14@336px, whose native 336 px (24x24 patches) is used instead.
    default_backbone = "openclip"
    default_image_size = 336
    supported_backbones = ("openclip",)
    needs_images = True
    needs_text = True
    inference_options = ("scales", "temperature", "window_batch")

    @dataclass
    class Config:
        scales: tuple[int, ...] = (2, 3)  # window sides in patches
        temperature: float = 0.07
        window_batch: int = 512  # windows per transformer call (memory bound only)

    def __init__(self, backbone: Backbone, config: Config | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(backbone, config, device)
        self.model = clip_model(backbone, self.name)
        if not self.config.scales or min(self.config.scales) < 1:
            raise ZsadError(f"winclip: option scales={self.config.scales} must list window sides >= 1")
        self._text: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_embeddings(self, category: str) -> torch.Tensor:
        """``(2, D)``: mean embedding of the normal and of the anomalous prompt ensemble of ``category``."""
        name = object_name(category)
        if name not in self._text:
            normal, anomalous = prompt_ensemble(name)
            emb = self.backbone.encode_text(normal + anomalous).float()
            self._text[name] = torch.stack([emb[: len(normal)].mean(0), emb[len(normal) :].mean(0)])
        return self._text[name]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        """Image embeddings ``(B, D)``, per scale window embeddings ``(B, n_windows, D)``, and the grid side."""
        visual = self.model.visual
        tokens = clip_embed(visual, images)
        b, length, c = tokens.shape
        grid = round((length - 1) ** 0.5)
        image = clip_pool(visual, visual.transformer(tokens)).float()
        windows = []
        for k in self.config.scales:
            idx = window_indices(grid, k).to(tokens.device) + 1  # +1: skip CLS
            idx = torch.cat([torch.zeros(len(idx), 1, dtype=idx.dtype, device=idx.device), idx], dim=1)
            seqs = tokens[:, idx].reshape(b * len(idx), k * k + 1, c)
            out = [
                clip_pool(visual, visual.transformer(chunk)).float() for chunk in seqs.split(self.config.window_batch)
            ]
            windows.append(torch.cat(out).reshape(b, len(idx), -1))
        return image, windows, grid

    def predict(self, batch: Batch) -> Prediction:
        if batch.images is None:
            raise ZsadError("winclip needs images (needs_images); the data source gave none")
        images = batch.images.to(self.device)
        text = torch.stack([self.text_embeddings(s.category) for s in batch.samples]).to(self.device)
        image_emb, window_embs, grid = self.encode(images)
        t = self.config.temperature
        image_scores = anomaly_probability(image_emb, text, t)
        maps = [image_scores[:, None, None].expand(-1, grid, grid)]
        for k, emb in zip(self.config.scales, window_embs, strict=True):
            scores = anomaly_probability(emb, text[:, None], t)
            maps.append(harmonic_aggregation(scores, grid, k))
        fused = len(maps) / (1.0 / torch.stack(maps)).sum(dim=0)
        size = images.shape[-1]
        fused = F.interpolate(fused[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        return Prediction(fused, image_scores)
