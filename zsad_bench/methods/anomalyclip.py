"""AnomalyCLIP: object-agnostic prompt learning for zero-shot anomaly detection.

Zhou et al., "AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly Detection", ICLR 2024
(arXiv 2310.18961); official code github.com/zqhang/AnomalyCLIP (``train.py``, ``test.py``,
``prompt_ensemble.py``, ``AnomalyCLIP_lib/AnomalyCLIP.py``), checked line by line against this plugin:

* two object-agnostic text prompts ``[V1..V12] object.`` / ``[W1..W12] damaged object.`` whose 12
  context embeddings are learned (N(0, 0.02) init, ``prompt_ensemble.py:152-157``), plus "compound" deep
  prompts: in text blocks 2..9 the 4 tokens after SOS are replaced by learned embeddings (depth 9, length 4;
  ``prompt_ensemble.py:158-163``, swapped in at ``AnomalyCLIP.py:235-254``);
* DPAM (diagonally prominent attention map): from block 6 of 24 on (``DPAM_layer=20`` replaces blocks
  ``[-1] .. [-19]``, ``AnomalyCLIP.py:345-352``) a second path adds the value-value self-attention output of
  each block (``AnomalyCLIP.py:57-96``, applied to the original path's ``ln_1`` tokens) and skips the MLP
  (``AnomalyCLIP.py:135-172``); patch features are taken from that path through ``ln_post`` and ``proj``
  (``AnomalyCLIP.py:383``), image features from the original path's CLS token times ``proj`` (the official
  code skips ``ln_post`` there, ``AnomalyCLIP.py:387``);
* patch/text similarity: softmax over (normal, anomalous) of cosine / 0.07, bilinear to S;
* loss: 4 x (focal + Dice(anomalous, mask) + Dice(normal, 1 - mask)) per feature layer plus the
  image-level cross-entropy; Adam lr 1e-3, betas (0.5, 0.999), batch 8, 15 epochs, only the
  prompts are trained (the whole CLIP stays frozen);
* test: map = sum over layers of (p_anomalous + 1 - p_normal) / 2, Gaussian sigma 4; image score =
  softmax probability of the anomalous prompt for the image feature.

Official runs: OpenAI ViT-L/14@336px at 518 px, patch features of the last block only (train.sh /
test.sh ``--features_list 24 --image_size 518``; the paper describes layers 6/12/18/24, selectable with
``layers``): the ``openclip`` backbone at its default size. The plugin runs on any backbone whose capabilities
declare a text tower and the token-insertion hook, through :class:`~zsad_bench.backbones.base.TextTower` and the
DPAM pieces of :class:`~zsad_bench.backbones.openclip.ClipVisionTower`; the CLIP model stays frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zsad_bench.backbones.base import Backbone, TextTower
from zsad_bench.detector import Batch, DataSource, Detector, FitContext, LearningType, Prediction, register_method
from zsad_bench.errors import ZsadError
from zsad_bench.methods.winclip import clip_towers
from zsad_bench.postprocess import dice_loss, gaussian_smooth


class PromptLearner(nn.Module):
    """Learnable normal/anomalous prompt contexts and compound deep-prompt tokens of a CLIP text tower."""

    def __init__(self, text: TextTower, n_ctx: int, depth: int, deep_len: int) -> None:
        super().__init__()
        width = text.width
        self.deep_len = deep_len
        self.ctx_normal = nn.Parameter(torch.randn(n_ctx, width) * 0.02)
        self.ctx_anomalous = nn.Parameter(torch.randn(n_ctx, width) * 0.02)
        self.deep = nn.ParameterList([nn.Parameter(torch.randn(deep_len, width) * 0.02) for _ in range(depth - 1)])
        prefix = " ".join(["X"] * n_ctx)
        tokens = text.tokenize([f"{prefix} object.", f"{prefix} damaged object."])
        with torch.no_grad():
            emb = text.embed_tokens(tokens).float()
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("sos", emb[:, :1], persistent=False)
        self.register_buffer("suffix", emb[:, 1 + n_ctx :], persistent=False)

    def forward(self) -> torch.Tensor:
        """Prompt token embeddings ``(2, L, W)``: [SOS, context, rest of the sentence]; row 0 normal, 1 anomalous."""
        ctx = torch.stack([self.ctx_normal, self.ctx_anomalous])
        return torch.cat([self.sos, ctx, self.suffix], dim=1)


def encode_learned_text(text: TextTower, learner: PromptLearner) -> torch.Tensor:
    """Text features ``(2, D)`` of the learned prompts, deep prompts swapped in before text blocks 2..depth."""

    def swap_deep(i: int, x: torch.Tensor) -> torch.Tensor:
        if not 1 <= i <= len(learner.deep):
            return x
        deep = learner.deep[i - 1].expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :1], deep, x[:, 1 + learner.deep_len :]], dim=1)

    return text.encode_embeddings(learner(), learner.tokens, before_block=swap_deep)


def dpam_forward(
    tower: Any, images: torch.Tensor, layers: tuple[int, ...], dpam_start: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Image features ``(B, D)`` and per requested block (1-based) patch features ``(B, N, D)``.

    ``tower`` is a :class:`~zsad_bench.backbones.openclip.ClipVisionTower`. Blocks ``>= dpam_start`` run two
    paths: the original one, and the DPAM one which adds the v-v attention of each block (computed from the
    original path) and skips the MLP.
    """
    x = tower.embed(images)
    x_ori = x
    outs: dict[int, torch.Tensor] = {}
    for i in range(1, tower.num_blocks + 1):
        if i < dpam_start:
            x = x_ori = tower.run_block(i, x_ori)
        else:
            original, value_value = tower.attention_branches(i, x_ori)
            x_ori = x_ori + original
            x_ori = x_ori + tower.mlp_branch(i, x_ori)
            x = x + value_value
        if i in layers:
            outs[i] = x
    image = tower.project(x_ori[:, 0])
    patches = [tower.project(tower.final_norm(outs[i][:, 1:])) for i in layers]
    return image, patches


def similarity_map(patches: torch.Tensor, text: torch.Tensor, size: int, temperature: float = 0.07) -> torch.Tensor:
    """``(B, 2, S, S)``: softmax over (normal, anomalous) of patch/text cosine / temperature, bilinear to S."""
    sim = (F.normalize(patches, dim=-1) @ F.normalize(text, dim=-1).T / temperature).softmax(-1)
    b, n, _ = sim.shape
    g = round(math.sqrt(n))
    sim = sim.transpose(1, 2).reshape(b, 2, g, g)
    return F.interpolate(sim, size=(size, size), mode="bilinear", align_corners=False)


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss of class probabilities ``(B, C, H, W)`` against integer targets ``(B, H, W)``.

    As the official ``FocalLoss``: one-hot clamped to [smooth/(C-1), 1-smooth], ``pt = <onehot, p> + smooth``.
    """
    c = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, c)
    onehot = F.one_hot(target.reshape(-1).long(), c).to(p.dtype).clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (onehot * p).sum(1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def resolve_blocks(layers: tuple[int, ...], n_blocks: int, method: str) -> tuple[int, ...]:
    """1-based block indices from ``layers`` (negative counts from the end, -1 = last block)."""
    out = tuple(i if i > 0 else n_blocks + 1 + i for i in layers)
    if not out or any(not 1 <= i <= n_blocks for i in out):
        raise ZsadError(f"{method}: option layers={layers} must be block numbers 1..{n_blocks} (or -1 for the last)")
    return out


@register_method
class AnomalyCLIP(Detector):
    """Object-agnostic learned text prompts scored against DPAM-refined CLIP patch features."""

    name = "anomalyclip"
    display_name = "AnomalyCLIP"
    learning_type = LearningType.ZERO_SHOT
    paper = "Zhou et al., AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly Detection, ICLR 2024"
    # Paper/official code: OpenAI CLIP ViT-L/14@336px at 518 px (the ``openclip`` backbone's default size).
    default_backbone = "openclip"
    # the registered backbones whose capabilities fit (checked by check_method_backbone), listed so that a name
    # is refused before any backbone is built
    supported_backbones = ("openclip", "openclip-vitb16plus")
    needs_images = True
    needs_text = True
    needs_token_insertion = True

    @dataclass
    class Config:
        n_ctx: int = field(default=12, metadata={"ge": 1, "help": "learnable context tokens per prompt"})
        depth: int = field(
            default=9, metadata={"ge": 1, "help": "text blocks receiving learned tokens (first via the prompt)"}
        )
        deep_len: int = field(default=4, metadata={"ge": 1, "help": "learned tokens swapped in per deeper text block"})
        dpam_layers: int = field(
            default=19, metadata={"ge": 0, "help": "top blocks refined by DPAM (official DPAM_layer=20: 6..24 of 24)"}
        )
        layers: tuple[int, ...] = field(
            default=(-1,), metadata={"help": "blocks whose patch features are scored (1-based, -1 = last)"}
        )
        epochs: int = field(default=15, metadata={"ge": 1, "help": "training epochs on the auxiliary set"})
        batch_size: int = field(default=8, metadata={"ge": 1, "help": "training batch size"})
        lr: float = field(default=1e-3, metadata={"gt": 0, "help": "Adam learning rate (betas 0.5, 0.999)"})
        local_weight: float = field(default=4.0, metadata={"ge": 0, "help": "weight of the segmentation losses"})
        temperature: float = field(default=0.07, metadata={"gt": 0, "help": "softmax temperature"})
        sigma: float = field(default=4.0, metadata={"inference": True, "ge": 0, "help": "Gaussian map smoothing"})

    def __init__(self, backbone: Backbone, config: Config | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(backbone, config, device)
        self.tower, self.text = clip_towers(backbone, self.name)
        backbone.requires_grad_(False)  # frozen by contract; gradients only reach the learned parts
        cfg = self.config
        n_text = self.text.num_blocks
        if not 1 <= cfg.depth <= n_text or cfg.n_ctx < cfg.deep_len:
            raise ZsadError(
                f"anomalyclip: options depth={cfg.depth} must be in 1..{n_text} and deep_len={cfg.deep_len} <= n_ctx"
            )
        n_blocks = self.tower.num_blocks
        self.blocks = resolve_blocks(cfg.layers, n_blocks, self.name)
        self.dpam_start = max(1, n_blocks - cfg.dpam_layers + 1)
        self.prompts = self.new_prompts()
        self._text: torch.Tensor | None = None

    def new_prompts(self) -> PromptLearner:
        """Freshly initialised learnable prompts (drawn from torch's global RNG)."""
        cfg = self.config
        return PromptLearner(self.text, cfg.n_ctx, cfg.depth, cfg.deep_len).to(self.device).eval()

    def text_features(self) -> torch.Tensor:
        """``(2, D)`` features of the normal and anomalous learned prompts."""
        return encode_learned_text(self.text, self.prompts).float()

    def losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(local loss summed over layers and weighted, image cross-entropy) for one training batch."""
        images = batch.images.to(self.device)
        masks = (batch.masks.to(self.device) > 0.5).float()
        with torch.no_grad():
            image, patches = dpam_forward(self.tower, images, self.blocks, self.dpam_start)
        text = F.normalize(self.text_features(), dim=-1)
        logits = F.normalize(image.float(), dim=-1) @ text.T / self.config.temperature
        image_loss = F.cross_entropy(logits, batch.labels.to(self.device).long())
        local = torch.zeros((), device=self.device)
        for p in patches:
            sim = similarity_map(p.float(), text, masks.shape[-1], self.config.temperature)
            local = local + focal_loss(sim, masks) + dice_loss(sim[:, 1], masks) + dice_loss(sim[:, 0], 1 - masks)
        return self.config.local_weight * local, image_loss

    def fit(self, data: DataSource, ctx: FitContext) -> None:
        cfg = self.config
        torch.manual_seed(ctx.seed)
        self.prompts = self.new_prompts().train()
        opt = torch.optim.Adam(self.prompts.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        for epoch in range(cfg.epochs):
            totals = []
            for batch in data.batches(cfg.batch_size, shuffle=True, seed=ctx.seed + epoch, masks=True):
                local, image_loss = self.losses(batch)
                opt.zero_grad()
                (local + image_loss).backward()
                opt.step()
                totals.append(float((local + image_loss).detach()))
            if ctx.progress:
                ctx.log(f"anomalyclip epoch {epoch + 1}/{cfg.epochs} loss {np.mean(totals):.4f}")
        self.prompts.eval()
        self._text = None

    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        if batch.images is None:
            raise ZsadError("anomalyclip needs images (needs_images); the data source gave none")
        if self._text is None:
            self._text = F.normalize(self.text_features(), dim=-1)
        images = batch.images.to(self.device)
        image, patches = dpam_forward(self.tower, images, self.blocks, self.dpam_start)
        t = self.config.temperature
        scores = (F.normalize(image.float(), dim=-1) @ self._text.T / t).softmax(-1)[:, 1]
        size = images.shape[-1]
        maps = torch.zeros(images.shape[0], size, size, device=self.device)
        for p in patches:
            sim = similarity_map(p.float(), self._text, size, t)
            maps = maps + (sim[:, 1] + 1 - sim[:, 0]) / 2
        return Prediction(gaussian_smooth(maps, self.config.sigma), scores)

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu().clone() for k, v in self.prompts.named_parameters()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = dict(self.prompts.named_parameters())
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            raise ZsadError("anomalyclip checkpoint does not match this prompt configuration; refit it")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state[k])
        self._text = None
