"""AnomalyCLIP: object-agnostic prompt learning for zero-shot anomaly detection.

Zhou et al., "AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly Detection", ICLR 2024
(arXiv 2310.18961); official code github.com/zqhang/AnomalyCLIP (``train.py``, ``test.py``,
``prompt_ensemble.py``, ``AnomalyCLIP_lib/AnomalyCLIP.py``). Reproduced from that code:

* two object-agnostic text prompts ``[V1..V12] object.`` / ``[W1..W12] damaged object.`` whose 12
  context embeddings are learned (N(0, 0.02) init), plus "compound" deep prompts: in text blocks
  2..9 the 4 tokens after SOS are replaced by learned embeddings (depth 9, length 4);
* DPAM (diagonally prominent attention map): from block 6 of 24 on (``DPAM_layer=20``) a second
  path adds the value-value self-attention output of each block (applied to the original path's
  normalised tokens) and skips the MLP; patch features are taken from that path, image features
  from the original path's CLS token times ``proj`` (the official code skips ``ln_post`` there);
* patch/text similarity: softmax over (normal, anomalous) of cosine / 0.07, bilinear to S;
* loss: 4 x (focal + Dice(anomalous, mask) + Dice(normal, 1 - mask)) per feature layer plus the
  image-level cross-entropy; Adam lr 1e-3, betas (0.5, 0.999), batch 8, 15 epochs, only the
  prompts are trained (the whole CLIP stays frozen);
* test: map = sum over layers of (p_anomalous + 1 - p_normal) / 2, Gaussian sigma 4; image score =
  softmax probability of the anomalous prompt for the image feature.

Official runs: OpenAI ViT-L/14@336px at 518 px, patch features of the last block only (train.sh /
test.sh ``--features_list 24``; the paper describes layers 6/12/18/24, selectable with ``layers``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from zsad_bench.backbones.base import Backbone
from zsad_bench.detector import Batch, DataSource, Detector, FitContext, LearningType, Prediction, register_method
from zsad_bench.errors import ZsadError
from zsad_bench.methods.winclip import clip_embed, clip_model
from zsad_bench.postprocess import dice_loss, gaussian_smooth


class PromptLearner(nn.Module):
    """Learnable normal/anomalous prompt contexts and compound deep-prompt tokens of the CLIP text tower."""

    def __init__(self, model: nn.Module, tokenizer: Any, n_ctx: int, depth: int, deep_len: int) -> None:
        super().__init__()
        width = model.token_embedding.weight.shape[1]
        self.deep_len = deep_len
        self.ctx_normal = nn.Parameter(torch.randn(n_ctx, width) * 0.02)
        self.ctx_anomalous = nn.Parameter(torch.randn(n_ctx, width) * 0.02)
        self.deep = nn.ParameterList([nn.Parameter(torch.randn(deep_len, width) * 0.02) for _ in range(depth - 1)])
        prefix = " ".join(["X"] * n_ctx)
        tokens = tokenizer([f"{prefix} object.", f"{prefix} damaged object."])
        with torch.no_grad():
            emb = model.token_embedding(tokens.to(model.token_embedding.weight.device)).float()
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("sos", emb[:, :1], persistent=False)
        self.register_buffer("suffix", emb[:, 1 + n_ctx :], persistent=False)

    def forward(self) -> torch.Tensor:
        """Prompt token embeddings ``(2, L, W)``: [SOS, context, rest of the sentence]; row 0 normal, 1 anomalous."""
        ctx = torch.stack([self.ctx_normal, self.ctx_anomalous])
        return torch.cat([self.sos, ctx, self.suffix], dim=1)


def encode_learned_text(model: nn.Module, learner: PromptLearner) -> torch.Tensor:
    """Text features ``(2, D)`` of the learned prompts, deep prompts swapped in before text blocks 2..depth."""
    x = learner() + model.positional_embedding.to(learner.ctx_normal.dtype)
    for i, block in enumerate(model.transformer.resblocks):
        if 1 <= i <= len(learner.deep):
            deep = learner.deep[i - 1].expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], deep, x[:, 1 + learner.deep_len :]], dim=1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = text_global_pool(x, learner.tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    return x @ model.text_projection


def attention_pair(attn: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of ``attn`` on ``x`` ``(B, L, C)``: the original q-k attention and DPAM's v-v attention."""
    b, n, c = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    original = F.scaled_dot_product_attention(q, k, v)
    value_value = F.scaled_dot_product_attention(v, v, v)
    out = [attn.out_proj(t.transpose(1, 2).reshape(b, n, c)) for t in (original, value_value)]
    return out[0], out[1]


def dpam_forward(
    visual: nn.Module, images: torch.Tensor, layers: tuple[int, ...], dpam_start: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Image features ``(B, D)`` and per requested block (1-based) patch features ``(B, N, D)``.

    Blocks ``>= dpam_start`` run two paths: the original one, and the DPAM one which adds the v-v
    attention of each block (computed from the original path) and skips the MLP.
    """
    x = clip_embed(visual, images)
    x_ori = x
    outs: dict[int, torch.Tensor] = {}
    for i, block in enumerate(visual.transformer.resblocks, start=1):
        if i < dpam_start:
            x = x_ori = block(x_ori)
        else:
            original, value_value = attention_pair(block.attn, block.ln_1(x_ori))
            x_ori = x_ori + block.ls_1(original)
            x_ori = x_ori + block.ls_2(block.mlp(block.ln_2(x_ori)))
            x = x + block.ls_1(value_value)
        if i in layers:
            outs[i] = x
    image = x_ori[:, 0] @ visual.proj
    patches = [visual.ln_post(outs[i][:, 1:]) @ visual.proj for i in layers]
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
    # Paper/official code: OpenAI CLIP ViT-L/14@336px at 518 px.
    default_backbone = "openclip"
    default_image_size = 518
    supported_backbones = ("openclip",)
    needs_images = True
    needs_text = True
    inference_options = ("sigma",)

    @dataclass
    class Config:
        n_ctx: int = 12  # learnable context tokens per prompt
        depth: int = 9  # text blocks that receive learned tokens (first one via the prompt itself)
        deep_len: int = 4  # learned tokens swapped in per deeper text block
        dpam_layers: int = 19  # top blocks refined by DPAM (official DPAM_layer=20 -> blocks 6..24 of 24)
        layers: tuple[int, ...] = (-1,)  # blocks whose patch features are scored (1-based, -1 = last)
        epochs: int = 15
        batch_size: int = 8
        lr: float = 1e-3
        local_weight: float = 4.0
        temperature: float = 0.07
        sigma: float = 4.0

    def __init__(self, backbone: Backbone, config: Config | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(backbone, config, device)
        self.model = clip_model(backbone, self.name)
        backbone.requires_grad_(False)  # frozen by contract; gradients only reach the learned parts
        tokenizer = getattr(backbone, "tokenizer", None)
        if tokenizer is None or not hasattr(self.model, "token_embedding"):
            raise ZsadError("anomalyclip needs an OpenCLIP model with its own text tower; use --backbone openclip")
        cfg = self.config
        n_text = len(self.model.transformer.resblocks)
        if not 1 <= cfg.depth <= n_text or cfg.n_ctx < cfg.deep_len:
            raise ZsadError(
                f"anomalyclip: options depth={cfg.depth} must be in 1..{n_text} and deep_len={cfg.deep_len} <= n_ctx"
            )
        n_blocks = len(self.model.visual.transformer.resblocks)
        self.blocks = resolve_blocks(cfg.layers, n_blocks, self.name)
        self.dpam_start = max(1, n_blocks - cfg.dpam_layers + 1)
        self._tokenizer = tokenizer
        self.prompts = self.new_prompts()
        self._text: torch.Tensor | None = None

    def new_prompts(self) -> PromptLearner:
        """Freshly initialised learnable prompts (drawn from torch's global RNG)."""
        cfg = self.config
        return PromptLearner(self.model, self._tokenizer, cfg.n_ctx, cfg.depth, cfg.deep_len).to(self.device).eval()

    def text_features(self) -> torch.Tensor:
        """``(2, D)`` features of the normal and anomalous learned prompts."""
        return encode_learned_text(self.model, self.prompts).float()

    def losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(local loss summed over layers and weighted, image cross-entropy) for one training batch."""
        images = batch.images.to(self.device)
        masks = (batch.masks.to(self.device) > 0.5).float()
        with torch.no_grad():
            image, patches = dpam_forward(self.model.visual, images, self.blocks, self.dpam_start)
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
        image, patches = dpam_forward(self.model.visual, images, self.blocks, self.dpam_start)
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
