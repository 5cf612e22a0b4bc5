"""VisualAD: language-free zero-shot anomaly detection with two learnable tokens inside a frozen ViT.

Hou et al., "VisualAD: Language-Free Zero-Shot Anomaly Detection via Vision Transformer", CVPR 2026
(arXiv 2603.07952); official code github.com/7HHHHH/VisualAD (``VisualAD_lib/VisualAD.py``,
``train.py``, ``test.py``, ``utils/spatial_cross_attention.py``, ``utils/feature_transform.py``,
``utils/training_utils.py``, ``utils/scoring.py``). Reproduced from that code:

* an anomaly and a normal token (init N(0, 1) * width^-0.5 * 0.1) are prepended to [CLS, patches]
  with their own fixed random position embeddings (N(0, 1) * width^-0.5; the official optimiser
  never updates them) and travel through every block of the frozen ViT; their last-block outputs
  after the final LayerNorm are the anomaly/normal prototypes;
* SCA (spatial-aware cross-attention), one per feature layer: 4 learned anchor queries attend to
  the layer's patch tokens (+ learned 2D position table), a sigmoid gate computed from the
  prototype weights the anchors, and the result is added to the prototype with a learned residual
  scale (init 0.01);
* SAF (self-alignment function), one MLP per feature layer (D -> D -> D, GELU, dropout 0.1) on the
  layer's LayerNorm-ed patch tokens;
* per layer map = cos(patch, anomaly) - cos(patch, normal), bilinear to S, summed over layers;
  losses: focal + Dice on sigmoid(map) per layer, BCE on the top-1% mean of the summed map, and a
  margin loss relu(cos(anomaly, normal) + 0.5) on the last layer's prototypes;
* AdamW (betas 0.9/0.999, weight decay 0.01), lr 1e-3 for the tokens, 1e-4 for the final
  LayerNorm (trained; this plugin trains a copy), SCA and SAF; cosine schedule per epoch to 0.1 lr;
  each token's gradient clipped to norm 1; batch 8; ``scripts/CLIP.sh``: 1 epoch VisA->MVTec,
  2 epochs MVTec->VisA;
* test: summed map, Gaussian sigma 4, image score = mean of its top 1% pixels.

Official runs: OpenAI CLIP ViT-L/14@336px (patch tokens without ``proj``) or DINOv2 ViT-L/14, 518 px,
feature layers 6/12/18/24. Supported backbones here: ``openclip`` (ViT towers) and ``dinov2``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zsad_bench.backbones.base import Backbone
from zsad_bench.detector import Batch, DataSource, Detector, FitContext, LearningType, Prediction, register_method
from zsad_bench.errors import ZsadError
from zsad_bench.methods.anomalyclip import focal_loss, resolve_blocks
from zsad_bench.methods.winclip import clip_embed
from zsad_bench.postprocess import dice_loss, gaussian_smooth


class FrozenViT:
    """Uniform view of a frozen ViT tower: pre-block tokens, blocks, final LayerNorm.

    Supports OpenCLIP vision transformers (``backbone.model.visual``) and Hugging Face DINOv2 models
    (``backbone.model`` with ``embeddings``/``encoder.layer``/``layernorm``).
    """

    def __init__(self, backbone: Backbone, method: str) -> None:
        model = getattr(backbone, "model", None)
        visual = getattr(model, "visual", None)
        if visual is not None and hasattr(visual, "conv1") and hasattr(visual, "transformer"):
            self.kind = "clip"
            self.tower = visual
            self.blocks = list(visual.transformer.resblocks)
            self.norm = visual.ln_post
            self.width = visual.class_embedding.shape[0]
        elif model is not None and all(hasattr(model, a) for a in ("embeddings", "encoder", "layernorm")):
            self.kind = "hf"
            self.tower = model
            self.blocks = list(model.encoder.layer)
            self.norm = model.layernorm
            self.width = model.config.hidden_size
        else:
            raise ZsadError(f"method '{method}' needs a ViT backbone with CLS token; use --backbone openclip or dinov2")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1+N, C)``: CLS and patch tokens with positions, as they enter the first block."""
        if self.kind == "clip":
            return clip_embed(self.tower, images)
        return self.tower.embeddings(images.to(self.tower.embeddings.patch_embeddings.projection.weight.dtype))

    def prepare(self, tokens: torch.Tensor) -> torch.Tensor:
        """Extra tokens (already with their positions) as they enter the first block (CLIP applies ``ln_pre``)."""
        return self.tower.ln_pre(tokens) if self.kind == "clip" else tokens

    @staticmethod
    def run_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One block on ``(B, L, C)`` tokens (HF layers of older transformers return tuples)."""
        out = block(x)
        return out[0] if isinstance(out, tuple) else out


class SpatialCrossAttention(nn.Module):
    """SCA: anchor queries over a layer's patch tokens, gated by the prototype, added as a scaled residual."""

    def __init__(
        self, dim: int, anchors: int = 4, dropout: float = 0.1, max_patches: int = 1536, res_scale: float = 0.01
    ) -> None:
        super().__init__()
        self.anchors = nn.Parameter(torch.randn(anchors, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, max_patches, dim) * 0.02)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.LayerNorm(dim)
        self.k_norm = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, anchors)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.res_scale = nn.Parameter(torch.full((1,), res_scale))
        for lin in (self.q, self.k, self.v, self.out):
            nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, prototype: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Enhanced prototype ``(B, C)`` from ``prototype`` ``(B, C)`` and ``patches`` ``(B, N, C)``."""
        b, n, c = patches.shape
        if n > self.pos.shape[1]:
            raise ZsadError(f"visualad: {n} patch tokens exceed SCA's {self.pos.shape[1]}; lower the image size")
        q = self.q_norm(self.q(self.anchors)).expand(b, -1, -1)
        k = self.k_norm(self.k(patches + self.pos[:, :n]))
        attn = self.dropout((q @ k.transpose(1, 2) * c**-0.5).softmax(-1))
        agg = attn @ self.v(patches)  # (B, anchors, C)
        gated = (agg * torch.sigmoid(self.gate(prototype))[..., None]).sum(1)
        return prototype + self.res_scale * self.dropout(self.out(gated))


def self_alignment(dim: int, dropout: float = 0.1) -> nn.Sequential:
    """SAF: the per-layer patch MLP ``D -> D -> D`` (GELU, dropout), Xavier weights and zero biases."""
    mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim), nn.Dropout(dropout))
    for m in mlp:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return mlp


def token_map(patches: torch.Tensor, anomaly: torch.Tensor, normal: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, S, S)``: cos(patch, anomaly) - cos(patch, normal) on the patch grid, bilinear to S."""
    p = F.normalize(patches, dim=-1, eps=1e-8)
    score = p @ F.normalize(anomaly, dim=-1, eps=1e-8)[..., None] - p @ F.normalize(normal, dim=-1, eps=1e-8)[..., None]
    b, n, _ = score.shape
    g = round(math.sqrt(n))
    return F.interpolate(score.reshape(b, 1, g, g), size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def topk_mean(maps: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mean of the ``ceil(ratio * H * W)`` largest values of each map ``(B, H, W)``."""
    flat = maps.flatten(1)
    k = max(1, math.ceil(flat.shape[1] * ratio))
    return flat.topk(k, dim=1).values.mean(1)


class VisualADHead(nn.Module):
    """Everything VisualAD learns: the two tokens, the final-norm copy, SCA and SAF per layer."""

    def __init__(self, vit: FrozenViT, n_layers: int, anchors: int, dropout: float, res_scale: float) -> None:
        super().__init__()
        w = vit.width
        scale = w**-0.5
        self.anomaly_token = nn.Parameter(torch.randn(w) * scale * 0.1)
        self.normal_token = nn.Parameter(torch.randn(w) * scale * 0.1)
        self.register_buffer("token_pos", torch.randn(2, w) * scale)  # fixed: the official optimiser skips them
        self.norm = copy.deepcopy(vit.norm).float().requires_grad_(True)
        self.sca = nn.ModuleList(
            SpatialCrossAttention(w, anchors, dropout, res_scale=res_scale) for _ in range(n_layers)
        )
        self.saf = nn.ModuleList(self_alignment(w, dropout) for _ in range(n_layers))


@register_method
class VisualAD(Detector):
    """Two learnable tokens inside a frozen ViT score patches by cosine to anomaly vs normal prototypes."""

    name = "visualad"
    display_name = "VisualAD"
    learning_type = LearningType.ZERO_SHOT
    paper = "Hou et al., VisualAD: Language-Free Zero-Shot Anomaly Detection via Vision Transformer, CVPR 2026"
    # Paper/official code: OpenAI CLIP ViT-L/14@336px (or DINOv2 ViT-L/14) at 518 px.
    default_backbone = "openclip"
    default_image_size = 518
    supported_backbones = ("openclip", "dinov2")
    needs_images = True
    inference_options = ("sigma",)

    @dataclass
    class Config:
        layers: tuple[int, ...] = (6, 12, 18, 24)  # 1-based blocks (negative: from the end)
        epochs: int = 1  # official scripts/CLIP.sh: 1 (VisA -> MVTec), 2 (MVTec -> VisA)
        batch_size: int = 8
        lr: float = 1e-3  # tokens; final norm, SCA and SAF use lr / 10
        weight_decay: float = 0.01
        anchors: int = 4
        dropout: float = 0.1
        res_scale: float = 0.01
        margin: float = 0.5
        topk_ratio: float = 0.01
        sigma: float = 4.0

    def __init__(self, backbone: Backbone, config: Config | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(backbone, config, device)
        self.vit = FrozenViT(backbone, self.name)
        backbone.requires_grad_(False)  # frozen by contract; gradients only reach the learned parts
        self.blocks = resolve_blocks(self.config.layers, len(self.vit.blocks), self.name)
        self.head = self.new_head()

    def new_head(self) -> VisualADHead:
        """Freshly initialised learnable parts (drawn from torch's global RNG), in eval mode."""
        cfg = self.config
        return VisualADHead(self.vit, len(self.blocks), cfg.anchors, cfg.dropout, cfg.res_scale).to(self.device).eval()

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Anomaly and normal prototypes ``(B, C)`` and per feature layer normed patch tokens ``(B, N, C)``."""
        head = self.head
        x = self.vit.embed(images)
        extra = self.vit.prepare(torch.stack([head.anomaly_token, head.normal_token]) + head.token_pos)
        x = torch.cat([extra.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        patches = []
        for i, block in enumerate(self.vit.blocks, start=1):
            x = self.vit.run_block(block, x)
            if i in self.blocks:
                patches.append(head.norm(x[:, 3:].float()))
        last = head.norm(x[:, :2].float())
        return last[:, 0], last[:, 1], patches

    def layer_maps(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per layer anomaly maps ``(B, S, S)`` and the last layer's SCA-enhanced prototypes."""
        anomaly, normal, patches = self.encode(images)
        size = images.shape[-1]
        maps = []
        for p, sca, saf in zip(patches, self.head.sca, self.head.saf, strict=True):
            a, n = sca(anomaly, p), sca(normal, p)
            maps.append(token_map(saf(p), a, n, size))
        return maps, a, n

    def fit(self, data: DataSource, ctx: FitContext) -> None:
        cfg = self.config
        torch.manual_seed(ctx.seed)
        head = self.head = self.new_head()
        small = [*head.norm.parameters(), *head.sca.parameters(), *head.saf.parameters()]
        opt = torch.optim.AdamW(
            [
                {"params": [head.anomaly_token], "lr": cfg.lr},
                {"params": [head.normal_token], "lr": cfg.lr},
                {"params": small, "lr": cfg.lr * 0.1},
            ],
            betas=(0.9, 0.999),
            weight_decay=cfg.weight_decay,
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.lr * 0.1)
        head.train()
        for epoch in range(cfg.epochs):
            totals = []
            for batch in data.batches(cfg.batch_size, shuffle=True, seed=ctx.seed + epoch, masks=True):
                loss = self.loss(batch)
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_([head.anomaly_token], 1.0)
                nn.utils.clip_grad_norm_([head.normal_token], 1.0)
                opt.step()
                totals.append(float(loss.detach()))
            sched.step()
            if ctx.progress:
                ctx.log(f"visualad epoch {epoch + 1}/{cfg.epochs} loss {np.mean(totals):.4f}")
        head.eval()

    def loss(self, batch: Batch) -> torch.Tensor:
        """Segmentation (focal + Dice per layer) + image BCE on the top-k mean + prototype margin loss."""
        images = batch.images.to(self.device)
        masks = (batch.masks.to(self.device) > 0.5).float()
        maps, a, n = self.layer_maps(images)
        seg = torch.zeros((), device=self.device)
        for m in maps:
            prob = torch.sigmoid(m)
            seg = seg + focal_loss(torch.stack([1 - prob, prob], dim=1), masks) + dice_loss(prob, masks)
        score = topk_mean(torch.stack(maps).sum(0), self.config.topk_ratio)
        image = F.binary_cross_entropy_with_logits(score, batch.labels.to(self.device).float())
        margin = F.relu(F.cosine_similarity(F.normalize(a, dim=1), F.normalize(n, dim=1)) + self.config.margin).mean()
        return seg + image + margin

    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        if batch.images is None:
            raise ZsadError("visualad needs images (needs_images); the data source gave none")
        maps, _, _ = self.layer_maps(batch.images.to(self.device))
        smooth = gaussian_smooth(torch.stack(maps).sum(0), self.config.sigma)
        return Prediction(smooth, topk_mean(smooth, self.config.topk_ratio))

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = self.head.state_dict()
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            raise ZsadError("visualad checkpoint does not match this configuration/backbone; refit it")
        self.head.load_state_dict(state)
