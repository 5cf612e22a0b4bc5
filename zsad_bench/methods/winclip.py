"""WinCLIP and WinCLIP+: zero-/few-shot anomaly classification and segmentation with CLIP windows.

Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation", CVPR 2023
(arXiv 2303.14814). The authors released no code; this follows the anomalib re-implementation
(openvinotoolkit/anomalib, ``src/anomalib/models/image/winclip/``, cited as ``torch_model.py:LINE`` etc.):

* backbone: OpenCLIP ViT-B-16-plus-240, ``laion400m_e31`` (``torch_model.py:47-48``), 240 px, a 15x15 grid:
  the ``openclip-vitb16plus`` backbone, this plugin's paper default. ``--backbone openclip`` (OpenAI
  ViT-L/14@336, 24x24 at 336 px) also runs; any backbone with a text tower and the token-insertion hook does;
* compositional prompt ensemble: 7 normal and 4 anomalous state words x 21 templates, the class
  embedding is the mean of its prompt embeddings (``prompting.py``, ``torch_model.py:391-400``);
* image score: softmax over (normal, anomalous) of cosine similarities / 0.07, anomalous entry
  (``torch_model.py:49,296``, ``utils.py`` ``class_scores``);
* windows of 2x2 and 3x3 patches (stride 1): the CLS token plus the window's position-embedded patch
  tokens go through the whole vision transformer, the pooled embedding is scored like the image
  (``torch_model.py:243-278``; ``ln_pre`` is per token, so applying it before or after selecting a window is the same);
* each patch takes the harmonic mean of the scores of the windows covering it, and the scales
  (image score broadcast, 2x2, 3x3) are fused by another harmonic mean (``torch_model.py:313-340``); bilinear
  upsampling to S (``torch_model.py:306-310``).

WinCLIP+ (method ``winclipplus``, few-shot) adds a reference memory of the k normal images (``torch_model.py:406-411``):
their full-scale patch embeddings (last block through ``ln_post``, not projected: open_clip's ``output_tokens``)
and their window embeddings per scale. A test patch/window scores its visual association, half the smallest cosine
distance to any reference entry of the same scale (``utils.py`` ``visual_association_score``, paper eq. 4); per
scale windows are harmonically aggregated and the scales averaged (``torch_model.py:342-375``). The map is the
mean of the zero-shot and few-shot maps, the image score the mean of the zero-shot image score and the few-shot
map's maximum (``torch_model.py:299-303``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from zsad_bench.backbones.base import Backbone, TextTower, VisionTower
from zsad_bench.detector import (
    Batch,
    DataSource,
    Detector,
    FitContext,
    LearningType,
    Prediction,
    register_method,
)
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


def clip_towers(backbone: Backbone, method: str) -> tuple[VisionTower, TextTower]:
    """The vision token-insertion hook and the text tower of ``backbone``, or one line naming CLIP backbones."""
    if backbone.tower is None or backbone.text is None or not hasattr(backbone.tower, "run_blocks"):
        raise ZsadError(
            f"method '{method}' needs a CLIP backbone (text tower + vision tower); "
            "use --backbone openclip-vitb16plus or openclip"
        )
    return backbone.tower, backbone.text


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


def visual_association(embeddings: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """``(B, N)``: half the smallest cosine distance of each embedding ``(B, N, D)`` to any memory row ``(M, D)``."""
    cos = F.normalize(embeddings, dim=-1) @ F.normalize(memory, dim=-1).T
    return (1 - cos).amin(dim=-1) / 2


def _scales_ok(scales: tuple[int, ...], method: str) -> None:
    if not scales or min(scales) < 1:
        raise ZsadError(f"{method}: option scales={scales} must list window sides >= 1")


@register_method
class WinCLIP(Detector):
    """Training-free CLIP scoring of the whole image and of 2x2 / 3x3 patch windows against prompt ensembles."""

    name = "winclip"
    display_name = "WinCLIP"
    learning_type = LearningType.TRAINING_FREE
    paper = "Jeong et al., WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation, CVPR 2023"
    # Paper/anomalib: OpenCLIP ViT-B-16-plus-240 (laion400m_e31) at its native 240 px (15x15 patches).
    default_backbone = "openclip-vitb16plus"
    # the registered backbones whose capabilities fit (checked by check_method_backbone), listed so that a name
    # is refused before any backbone is built
    supported_backbones = ("openclip-vitb16plus", "openclip")
    needs_images = True
    needs_text = True
    needs_token_insertion = True

    @dataclass
    class Config:
        scales: tuple[int, ...] = field(
            default=(2, 3), metadata={"inference": True, "help": "window sides in patches (anomalib: 2, 3)"}
        )
        temperature: float = field(
            default=0.07, metadata={"inference": True, "gt": 0, "help": "softmax temperature (CLIP's 0.07)"}
        )
        window_batch: int = field(
            default=512, metadata={"inference": True, "ge": 1, "help": "windows per transformer call (memory only)"}
        )

    def __init__(self, backbone: Backbone, config: Config | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(backbone, config, device)
        self.tower, self.text = clip_towers(backbone, self.name)
        _scales_ok(self.config.scales, self.name)
        self._text: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_embeddings(self, category: str) -> torch.Tensor:
        """``(2, D)``: mean embedding of the normal and of the anomalous prompt ensemble of ``category``."""
        name = object_name(category)
        if name not in self._text:
            normal, anomalous = prompt_ensemble(name)
            emb = self.text.encode(normal + anomalous).float()
            self._text[name] = torch.stack([emb[: len(normal)].mean(0), emb[len(normal) :].mean(0)])
        return self._text[name]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, int]:
        """Image embeddings ``(B, D)``, per scale window embeddings ``(B, n_windows, D)``, the full-scale patch
        embeddings ``(B, N, C)`` (last block through the final norm) and the grid side."""
        tower = self.tower
        tokens = tower.embed(images)
        b, length, c = tokens.shape
        grid = round((length - 1) ** 0.5)
        last = tower.run_blocks(tokens)
        image = tower.pool(last).float()
        patches = tower.final_norm(last[:, 1:]).float()
        windows = []
        for k in self.config.scales:
            idx = window_indices(grid, k).to(tokens.device) + 1  # +1: skip CLS
            idx = torch.cat([torch.zeros(len(idx), 1, dtype=idx.dtype, device=idx.device), idx], dim=1)
            seqs = tokens[:, idx].reshape(b * len(idx), k * k + 1, c)
            out = [tower.pool(tower.run_blocks(chunk)).float() for chunk in seqs.split(self.config.window_batch)]
            windows.append(torch.cat(out).reshape(b, len(idx), -1))
        return image, windows, patches, grid

    def zero_shot(
        self, batch: Batch, image_emb: torch.Tensor, window_embs: list[torch.Tensor], grid: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-shot patch-grid map ``(B, g, g)`` (harmonic fusion of scales) and image scores ``(B,)``."""
        text = torch.stack([self.text_embeddings(s.category) for s in batch.samples]).to(self.device)
        t = self.config.temperature
        image_scores = anomaly_probability(image_emb, text, t)
        maps = [image_scores[:, None, None].expand(-1, grid, grid)]
        for k, emb in zip(self.config.scales, window_embs, strict=True):
            scores = anomaly_probability(emb, text[:, None], t)
            maps.append(harmonic_aggregation(scores, grid, k))
        return len(maps) / (1.0 / torch.stack(maps)).sum(dim=0), image_scores

    def images_of(self, batch: Batch) -> torch.Tensor:
        if batch.images is None:
            raise ZsadError(f"{self.name} needs images (needs_images); the data source gave none")
        return batch.images.to(self.device)

    def predict(self, batch: Batch) -> Prediction:
        images = self.images_of(batch)
        image_emb, window_embs, _, grid = self.encode(images)
        fused, image_scores = self.zero_shot(batch, image_emb, window_embs, grid)
        return Prediction(upsample(fused, images.shape[-1]), image_scores)


def upsample(grid_map: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear ``(B, g, g)`` -> ``(B, S, S)`` (anomalib ``torch_model.py:306-310``)."""
    return F.interpolate(grid_map[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


@register_method
class WinCLIPPlus(WinCLIP):
    """WinCLIP+: WinCLIP's zero-shot scores averaged with visual association to k normal reference images."""

    name = "winclipplus"
    display_name = "WinCLIP+"
    learning_type = LearningType.FEW_SHOT

    @dataclass
    class Config:
        scales: tuple[int, ...] = field(
            default=(2, 3), metadata={"help": "window sides in patches (anomalib: 2, 3); the memory holds each"}
        )
        temperature: float = field(
            default=0.07, metadata={"inference": True, "gt": 0, "help": "softmax temperature (CLIP's 0.07)"}
        )
        window_batch: int = field(
            default=512, metadata={"inference": True, "ge": 1, "help": "windows per transformer call (memory only)"}
        )

    memory: dict[str, torch.Tensor]

    def __init__(self, backbone: Backbone, config: Config | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(backbone, config, device)
        self.memory = {}

    def fit(self, data: DataSource, ctx: FitContext) -> None:
        """Reference memory: full-scale patch embeddings and window embeddings of each scale of the k images."""
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in data.batches(8):
            _, windows, patches, _ = self.encode(self.images_of(batch))
            for key, value in [
                ("patches", patches),
                *((f"windows_{k}", w) for k, w in zip(self.config.scales, windows, strict=True)),
            ]:
                parts.setdefault(key, []).append(value.reshape(-1, value.shape[-1]))
        if not parts:
            raise ZsadError("winclipplus: no reference images; pass --shots 1 or more")
        self.memory = {key: torch.cat(values) for key, values in parts.items()}

    def few_shot(self, window_embs: list[torch.Tensor], patches: torch.Tensor, grid: int) -> torch.Tensor:
        """Few-shot map ``(B, g, g)``: mean over scales of the (harmonically aggregated) visual association."""
        if not self.memory:
            raise ZsadError("winclipplus: predict before fit; it needs the k reference images first")
        maps = [visual_association(patches, self.memory["patches"]).reshape(-1, grid, grid)]
        for k, emb in zip(self.config.scales, window_embs, strict=True):
            maps.append(harmonic_aggregation(visual_association(emb, self.memory[f"windows_{k}"]), grid, k))
        return torch.stack(maps).mean(dim=0)

    def predict(self, batch: Batch) -> Prediction:
        images = self.images_of(batch)
        image_emb, window_embs, patches, grid = self.encode(images)
        zero, image_scores = self.zero_shot(batch, image_emb, window_embs, grid)
        few = self.few_shot(window_embs, patches, grid)
        scores = (image_scores + few.amax(dim=(-2, -1))) / 2
        return Prediction(upsample((zero + few) / 2, images.shape[-1]), scores)

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu().clone() for k, v in self.memory.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"patches", *(f"windows_{k}" for k in self.config.scales)}
        if set(state) != expected:
            raise ZsadError(
                f"winclipplus checkpoint holds {sorted(state)}, this configuration needs {sorted(expected)}"
            )
        self.memory = {k: v.to(self.device) for k, v in state.items()}
