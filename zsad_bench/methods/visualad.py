"""VisualAD: language-free zero-shot anomaly detection with two learnable tokens inside a frozen ViT.

Hou et al., "VisualAD: Language-Free Zero-Shot Anomaly Detection via Vision Transformer", CVPR 2026
(arXiv 2603.07952); official code github.com/7HHHHH/VisualAD (``VisualAD_lib/VisualAD.py``,
``train.py``, ``test.py``, ``utils/spatial_cross_attention.py``, ``utils/feature_transform.py``,
``utils/training_utils.py``, ``utils/scoring.py``). Reproduced from that code:

* an anomaly and a normal token (init N(0, 1) * width^-0.5 * 0.1, ``VisualAD_lib/VisualAD.py:94-95``) are
  prepended to [CLS, patches] (``VisualAD.py:132``) and travel through every block of the frozen ViT; their
  position embedding is the CLS token's (``build_model.py:50-53`` initialises ``anomaly_pos``/``normal_pos``
  from the pretrained CLS entry; the optimiser never updates them, ``utils/training_utils.py:50-71``), added
  before ``ln_pre`` like every other position (``VisualAD.py:134-147``), so here it is the backbone's own CLS
  position, read through the token-insertion hook (frozen). Their last-block outputs after the final LayerNorm
  are the anomaly/normal prototypes (``VisualAD.py:163-164``);
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
  2 epochs MVTec->VisA (declared in ``dataset_defaults``, keyed by the target dataset);
* test: summed map, Gaussian sigma 4, image score = mean of its top 1% pixels.

Official runs: OpenAI CLIP ViT-L/14@336px (patch tokens without ``proj``) or DINOv2 ViT-L/14, 518 px,
feature layers 6/12/18/24. Runs here on every backbone declaring the token-insertion hook (``openclip*``,
``dinov2*``), through :class:`~zsad_bench.backbones.base.VisionTower` only.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zsad_bench.backbones.base import Backbone, VisionTower
from zsad_bench.detector import Batch, DataSource, Detector, FitContext, LearningType, Prediction, register_method
from zsad_bench.errors import ZsadError
from zsad_bench.methods.anomalyclip import focal_loss, resolve_blocks
from zsad_bench.postprocess import dice_loss, gaussian_smooth


def vision_tower(backbone: Backbone, method: str) -> VisionTower:
    """The backbone's token-insertion hook, or one line naming the backbones that have it."""
    if backbone.tower is None:
        raise ZsadError(
            f"method '{method}' needs a ViT backbone with the token-insertion hook; use --backbone openclip or dinov2"
        )
    return backbone.tower


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

    def __init__(self, tower: VisionTower, n_layers: int, anchors: int, dropout: float, res_scale: float) -> None:
        super().__init__()
        w = tower.width
        scale = w**-0.5
        self.anomaly_token = nn.Parameter(torch.randn(w) * scale * 0.1)
        self.normal_token = nn.Parameter(torch.randn(w) * scale * 0.1)
        self.norm = copy.deepcopy(tower.final_norm).float().requires_grad_(True)
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
    # Paper/official code: OpenAI CLIP ViT-L/14@336px (or DINOv2 ViT-L/14) at 518 px (``openclip``'s default size).
    default_backbone = "openclip"
    # the registered backbones whose capabilities fit (checked by check_method_backbone), listed so that a name
    # is refused before any backbone is built
    supported_backbones = ("openclip", "dinov2", "openclip-vitb16plus", "dinov2-vits14", "dinov2-vitb14")
    needs_images = True
    needs_token_insertion = True
    # official scripts/CLIP.sh: MVTec -> VisA trains 2 epochs, VisA -> MVTec 1 (keyed by the target dataset)
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {"visa": {"epochs": 2}, "mvtec": {"epochs": 1}}

    @dataclass
    class Config:
        layers: tuple[int, ...] = field(
            default=(6, 12, 18, 24), metadata={"help": "1-based feature blocks (negative: from the end)"}
        )
        epochs: int = field(default=1, metadata={"ge": 1, "help": "training epochs (per target: dataset_defaults)"})
        batch_size: int = field(default=8, metadata={"ge": 1, "help": "training batch size"})
        lr: float = field(default=1e-3, metadata={"gt": 0, "help": "tokens' lr; final norm, SCA and SAF use lr / 10"})
        weight_decay: float = field(default=0.01, metadata={"ge": 0, "help": "AdamW weight decay"})
        anchors: int = field(default=4, metadata={"ge": 1, "help": "SCA anchor queries"})
        dropout: float = field(default=0.1, metadata={"ge": 0, "lt": 1, "help": "SCA/SAF dropout"})
        res_scale: float = field(default=0.01, metadata={"help": "initial SCA residual scale"})
        margin: float = field(default=0.5, metadata={"help": "prototype margin: relu(cos(a, n) + margin)"})
        topk_ratio: float = field(
            default=0.01, metadata={"gt": 0, "le": 1, "help": "image score: mean of this top fraction of pixels"}
        )
        sigma: float = field(default=4.0, metadata={"inference": True, "ge": 0, "help": "Gaussian map smoothing"})

    def __init__(self, backbone: Backbone, config: Config | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(backbone, config, device)
        self.tower = vision_tower(backbone, self.name)
        backbone.requires_grad_(False)  # frozen by contract; gradients only reach the learned parts
        self.blocks = resolve_blocks(self.config.layers, self.tower.num_blocks, self.name)
        self.head = self.new_head()

    def new_head(self) -> VisualADHead:
        """Freshly initialised learnable parts (drawn from torch's global RNG), in eval mode."""
        cfg = self.config
        return (
            VisualADHead(self.tower, len(self.blocks), cfg.anchors, cfg.dropout, cfg.res_scale).to(self.device).eval()
        )

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Anomaly and normal prototypes ``(B, C)`` and per feature layer normed patch tokens ``(B, N, C)``."""
        head, tower = self.head, self.tower
        x = tower.insert(tower.embed(images), torch.stack([head.anomaly_token, head.normal_token]))
        start = 2 + tower.num_prefix_tokens  # the two inserted tokens, CLS (and registers), then patches
        patches = []
        for i in range(1, tower.num_blocks + 1):
            x = tower.run_block(i, x)
            if i in self.blocks:
                patches.append(head.norm(x[:, start:].float()))
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
