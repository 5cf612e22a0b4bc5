"""FoundAD: a small ViT projector trained to map (synthetically corrupted) features onto normal ones.

Zhai et al., "Foundation Visual Encoders Are Secretly Few-Shot Anomaly Detectors", ICLR 2026
(arXiv 2510.01934); official code github.com/ymxlzgy/FoundAD (``foundad/src/foundad.py``,
``train.py``, ``AD.py``, ``utils/synthesis.py``, ``datasets/dataset.py``,
``dinov2/models/vision_transformer.py``: ``VisionTransformerPredictor``; configs ``config.yaml``,
``app/train_dinov3.yaml``).

Model (official ``vit_predictor``): ``Linear(C -> 384)``, 6 pre-norm transformer blocks (12 heads,
MLP ratio 4, qkv bias, LayerNorm eps 1e-6) where every block output gets the embedded input added
(``x = block(x) + x0``), a final LayerNorm and ``Linear(384 -> C)``; no positional embedding
(``if_pred_pe: false``). Init: every Linear truncated-normal(0.02) with zero bias, LayerNorms (1, 0).
The predictor's own ``fix_init_weight`` divides the block output projections by ``sqrt(2 * depth_index)``
(``dinov2/models/vision_transformer.py:469-479``), but ``VisionModule`` then calls ``_init_predictor``
(``src/foundad.py:33``, ``:120-123``), which re-draws every Linear weight and so undoes that rescale;
this plugin initialises as the released model ends up. With ``C = 768`` (the paper's DINOv3 ViT-B/16)
this is 11.2M parameters; on this harness's ``dinov3`` (ViT-L/16, ``C = 1024``) 11.4M.

Training (``src/train.py``): AdamW (lr 1e-3, weight decay 1e-4, constant), batches of 8 images
(``configs/config.yaml:12``; a ``DataLoader`` with ``drop_last=True``, ``datasets/dataset.py:324-329``,
over the k shots of *all* categories: 15 images at 1-shot MVTec AD, so every step sees 8 of them). Each
image of a batch gets, independently, the "staged" augmentation of ``dataset.py`` (with p = 0.3 one of
h-flip, v-flip, rot 90/270; with p = 0.3 one of colour jitter (0.3, 0.3, 0.3, 0.05), grayscale,
Gaussian blur); with probability 0.5 per step the projector's input is the CutPaste-corrupted batch
(``train.py:117-124``; ``CutPasteUnion``: per image "normal" (area 2-25%, aspect 0.3-3.3) or "scar"
(2-16 x 10-25 px at 512 px, rotated +-45 deg) with colour jitter 0.5 on the patch). The loss is the MSE
between the frozen backbone's features of the clean batch and the projector's output on dropout(0.2)-ed
features of the (possibly corrupted) batch. Here every step draws ``batch_size`` = 8 images from the
references by cycling through shuffled passes over them, each copy augmented on its own, so a 1-shot
category still trains on batches of 8 differently augmented copies (never on a batch of 1). The README's
evaluation uses checkpoint step 1950, hence ``steps=1950``.

Features (``src/foundad.py:81-87``): ``get_intermediate_layers(imgs, n=3)[0]``, the third-last block
passed through the encoder's final LayerNorm (``norm=True`` default), at ``crop_size: 512``
(``configs/app/train_dinov3.yaml:4``, ``:9``). Here: block ``num_blocks - block_from_end + 1`` as layer
``"N:norm"`` (``final_norm``) where the backbone offers final-normed layers, else its raw output; on
backbones without numbered blocks (``effnet-lite0``) the default layer.

Scoring (``AD.py:56-59``, ``:106``): per patch the mean squared residual over channels between the
features and the projector's output; image score = mean of the top-K patch residuals (``top_k``:
``K_top_mvtec: 10``, ``K_top_visa: 6``, ``configs/config.yaml:71-72``, applied from the target by
``dataset_defaults``); map = residual grid bilinearly upsampled to S, no smoothing.

One projector or one per category (``projector_scope``): the paper trains one projector on the k shots
of all categories of a dataset ("dataset", the ``paper`` preset); "category" fits one per category. The
detector fits on whatever references it is given; ``fit_scope`` tells the runner which to hand it.

CutPaste is done on the preprocessed image tensors and the backbone runs inside ``fit``
(``needs_images``): a feature-level imitation would not reproduce how an image-space paste changes
the tokens of a ViT (context mixing, colour jitter), which is what the projector learns to undo.

Differences: the registered ``dinov3`` is ViT-L/16 (the paper: ViT-B/16; no ViT-B/16 DINOv3 is
registered). The paste position is uniform over the image (official: restricted to a per-category
Otsu/triangle foreground mask keyed by MVTec/VisA class names); colour jitter is applied in [0, 1]
pixel space (official: on the normalised tensor); scar sizes are scaled by S/512; images are resized to
S x S (official: resize to 512). Runs on any backbone, ``effnet-lite0`` included.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn

from zsad_bench.backbones.base import Backbone
from zsad_bench.detector import Batch, DataSource, Detector, FitContext, LearningType, Prediction, register_method
from zsad_bench.errors import ZsadError
from zsad_bench.presets import PaperSetting


class _Block(nn.Module):
    """Pre-norm transformer block (multi-head self-attention + GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Projector(nn.Module):
    """FoundAD's predictor: tokens ``(B, N, C)`` -> tokens ``(B, N, C)`` (see module docstring)."""

    def __init__(self, in_dim: int, dim: int = 384, depth: int = 6, heads: int = 12) -> None:
        super().__init__()
        if dim % heads:
            raise ZsadError(f"foundad: projector width {dim} is not divisible by {heads} heads")
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.out = nn.Linear(dim, in_dim)
        for m in self.modules():  # the released init (_init_predictor): no depth rescale survives
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.embed(x)
        x = x0
        for blk in self.blocks:
            x = blk(x) + x0
        return self.out(self.norm(x))


def patch_residuals(features: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Per-patch mean squared residual over channels: ``(B, N, C)`` x2 -> ``(B, N)``."""
    return (features - predicted).pow(2).mean(dim=-1)


def top_k_mean(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` largest values of each row (all of them when a row is shorter)."""
    return values.topk(min(k, values.shape[-1]), dim=-1).values.mean(dim=-1)


def _color_jitter(img: torch.Tensor, strength: float, hue: float, rng: random.Random) -> torch.Tensor:
    """torchvision ``ColorJitter(strength, strength, strength, hue)`` on a [0, 1] ``(3, H, W)`` image."""
    ops = [
        lambda t: TF.adjust_brightness(t, rng.uniform(1 - strength, 1 + strength)),
        lambda t: TF.adjust_contrast(t, rng.uniform(1 - strength, 1 + strength)),
        lambda t: TF.adjust_saturation(t, rng.uniform(1 - strength, 1 + strength)),
        lambda t: TF.adjust_hue(t, rng.uniform(-hue, hue)),
    ]
    rng.shuffle(ops)
    for op in ops:
        img = op(img)
    return img


class Synthesis:
    """FoundAD's image-space augmentation and CutPaste on normalised ``(3, S, S)`` tensors.

    ``mean``/``std`` are the backbone's normalisation; all randomness comes from ``rng``.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], rng: random.Random, jitter: float = 0.5):
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.rng = rng
        self.jitter = jitter

    def _to01(self, t: torch.Tensor) -> torch.Tensor:
        return (t * self.std.to(t) + self.mean.to(t)).clamp(0, 1)

    def _norm(self, t: torch.Tensor) -> torch.Tensor:
        return (t - self.mean.to(t)) / self.std.to(t)

    def augment(self, img: torch.Tensor) -> torch.Tensor:
        """The official "staged" train augmentation (orientation p=0.3, appearance p=0.3)."""
        rng = self.rng
        if rng.random() < 0.3:
            choice = rng.randrange(3)
            if choice == 0:
                img = img.flip(-1)
            elif choice == 1:
                img = img.flip(-2)
            else:
                img = torch.rot90(img, k=rng.choice((1, 3)), dims=(-2, -1))
        if rng.random() < 0.3:
            choice = rng.randrange(3)
            pix = self._to01(img)
            if choice == 0:
                pix = _color_jitter(pix, 0.3, 0.05, rng)
            elif choice == 1:
                pix = TF.rgb_to_grayscale(pix, num_output_channels=3)
            else:
                size = 23 if img.shape[-1] >= 384 else 11
                pix = TF.gaussian_blur(pix, [size, size], [rng.uniform(0.1, 2.0)] * 2)
            img = self._norm(pix)
        return img

    def _jittered(self, patch: torch.Tensor) -> torch.Tensor:
        if self.jitter <= 0:
            return patch
        return self._norm(_color_jitter(self._to01(patch), self.jitter, min(self.jitter, 0.5), self.rng))

    def cutpaste(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CutPaste "normal" or "scar" (50/50) on one image; returns the image and the pasted-pixel mask."""
        _, h, w = img.shape
        rng = self.rng
        if rng.random() < 0.5:
            area = rng.uniform(0.02, 0.25) * h * w
            aspect = rng.uniform(0.3, 1 / 0.3)
            cw = min(w, round(math.sqrt(area * aspect)))
            ch = min(h, round(math.sqrt(area / aspect)))
            rotation = 0.0
        else:
            scale = w / 512
            cw = max(1, int(rng.uniform(2, 16) * scale))
            ch = max(1, int(rng.uniform(10, 25) * scale))
            rotation = rng.uniform(-45, 45)
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        patch = self._jittered(img[:, y0 : y0 + ch, x0 : x0 + cw])
        if rotation:
            patch = TF.rotate(patch, rotation, interpolation=TF.InterpolationMode.BILINEAR, expand=True)
            ph, pw = min(h, patch.shape[1]), min(w, patch.shape[2])
            patch = patch[:, :ph, :pw]
        ph, pw = patch.shape[1:]
        top, left = rng.randint(0, h - ph), rng.randint(0, w - pw)
        return paste(img, patch, top, left)


def paste(img: torch.Tensor, patch: torch.Tensor, top: int, left: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy of ``img`` with ``patch`` written at (``top``, ``left``) and the boolean mask of written pixels."""
    out = img.clone()
    _, ph, pw = patch.shape
    out[:, top : top + ph, left : left + pw] = patch
    mask = torch.zeros(img.shape[1:], dtype=torch.bool, device=img.device)
    mask[top : top + ph, left : left + pw] = True
    return out, mask


@register_method
class FoundAD(Detector):
    """Few-shot residual scoring with a trained feature projector (see module docstring)."""

    name = "foundad"
    display_name = "FoundAD"
    learning_type = LearningType.FEW_SHOT
    paper = "Zhai et al., Foundation Visual Encoders Are Secretly Few-Shot Anomaly Detectors, ICLR 2026"
    default_backbone = "dinov3"
    needs_images = True
    paper_setting: ClassVar[PaperSetting] = PaperSetting(
        "dinov3",
        512,
        config={"projector_scope": "dataset"},
        note="DINOv3 at crop 512, third-last block with the final norm, one projector for all categories",
    )
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {"mvtec": {"top_k": 10}, "visa": {"top_k": 6}}

    @dataclass
    class Config:
        steps: int = field(default=1950, metadata={"ge": 1, "help": "optimisation steps (README: checkpoint 1950)"})
        batch_size: int = field(default=8, metadata={"ge": 1, "help": "images per step (drawn with repetition)"})
        lr: float = field(default=1e-3, metadata={"gt": 0.0, "help": "AdamW learning rate"})
        weight_decay: float = field(default=1e-4, metadata={"ge": 0.0, "help": "AdamW weight decay"})
        width: int = field(default=384, metadata={"ge": 1, "help": "projector embedding width"})
        depth: int = field(default=6, metadata={"ge": 1, "help": "projector blocks"})
        heads: int = field(default=12, metadata={"ge": 1, "help": "projector attention heads"})
        dropout: float = field(default=0.2, metadata={"ge": 0.0, "lt": 1.0, "help": "input dropout while training"})
        p_cutpaste: float = field(default=0.5, metadata={"ge": 0.0, "le": 1.0, "help": "P(step input is CutPaste)"})
        jitter: float = field(default=0.5, metadata={"ge": 0.0, "help": "colour jitter of the pasted patch"})
        augment: bool = field(default=True, metadata={"help": "official flip/rotate/appearance augmentation"})
        top_k: int = field(
            default=10, metadata={"inference": True, "ge": 1, "help": "image score: top-K mean (MVTec 10, VisA 6)"}
        )
        block_from_end: int = field(
            default=3, metadata={"ge": 0, "help": "ViT block counted from the end (official n=3); 0: default layer"}
        )
        final_norm: bool = field(default=True, metadata={"help": "pass the block through the final norm (official)"})
        projector_scope: str = field(
            default="category",
            metadata={"choices": ("category", "dataset"), "help": "one projector per category or per dataset (paper)"},
        )

    def __init__(self, backbone: Backbone, config: Config | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(backbone, config, device)
        cfg = self.config
        if cfg.block_from_end < 0:
            raise ZsadError(f"option foundad.block_from_end={cfg.block_from_end}: use 0 (default layer) or >= 1")
        for key in ("steps", "batch_size", "width", "depth", "heads", "top_k"):
            if getattr(cfg, key) < 1:
                raise ZsadError(f"option foundad.{key}={getattr(cfg, key)}: use an integer >= 1")
        if not 0.0 <= cfg.p_cutpaste <= 1.0 or not 0.0 <= cfg.dropout < 1.0:
            raise ZsadError("options foundad.p_cutpaste / foundad.dropout: use probabilities in [0, 1)")
        if cfg.projector_scope not in ("category", "dataset"):
            raise ZsadError(f"option foundad.projector_scope={cfg.projector_scope}: use category or dataset")
        self.projector: Projector | None = None
        self.losses: list[float] = []

    @property
    def fit_scope(self) -> str:
        """What one ``fit`` gets: the k shots of one category or of all categories of the target dataset."""
        return self.config.projector_scope

    def feature_layer(self) -> str | None:
        """Block ``block_from_end`` from the end (``"N:norm"`` when final-normed), else None (default layer)."""
        caps = self.backbone.capabilities
        depth = caps.num_blocks
        if depth is None or self.config.block_from_end < 1:
            return None
        block = max(1, depth - self.config.block_from_end + 1)
        normed = self.config.final_norm and caps.normed_layers
        return f"{block}:norm" if normed else str(block)

    def batch_indices(self, n_refs: int, gen: torch.Generator) -> list[list[int]]:
        """Reference indices of every step: ``batch_size`` each, cycling through shuffled passes over the refs."""
        cfg = self.config
        stream: list[int] = []
        steps: list[list[int]] = []
        for _ in range(cfg.steps):
            while len(stream) < cfg.batch_size:
                stream.extend(torch.randperm(n_refs, generator=gen).tolist())
            steps.append(stream[: cfg.batch_size])
            stream = stream[cfg.batch_size :]
        return steps

    def grid(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen backbone token grid ``(B, h, w, C)`` of preprocessed images."""
        layer = self.feature_layer()
        with torch.no_grad():
            feats = self.backbone.forward_features(images.to(self.device), None if layer is None else (layer,))
        return feats.layer(layer).float()

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen backbone tokens ``(B, N, C)`` of preprocessed images."""
        return self.grid(images).flatten(1, 2)

    def fit(self, data: DataSource, ctx: FitContext) -> None:
        """Train the projector on the k normal references (with synthesised anomalies)."""
        cfg = self.config
        rng = random.Random(ctx.seed)
        gen = torch.Generator().manual_seed(ctx.seed)
        pre = self.backbone.preprocess
        synth = Synthesis(pre.mean, pre.std, rng, cfg.jitter)
        refs = [img for b in data.batches(cfg.batch_size) for img in _images(b)]
        if not refs:
            raise ZsadError("foundad: no reference images; pass --shots 1 or more")
        self.projector = None
        self.losses = []
        for step, order in enumerate(self.batch_indices(len(refs), gen)):
            clean = torch.stack([synth.augment(refs[i]) if cfg.augment else refs[i] for i in order])
            target = self.tokens(clean)
            if self.projector is None:
                self.projector = self._build(target.shape[-1])
                opt = torch.optim.AdamW(self.projector.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            context = target
            if rng.random() < cfg.p_cutpaste:
                context = self.tokens(torch.stack([synth.cutpaste(img)[0] for img in clean]))
            drop = F.dropout(context, cfg.dropout, training=True) if cfg.dropout else context
            loss = F.mse_loss(self.projector(drop), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.losses.append(loss.detach().item())
            if ctx.progress and (step + 1) % 250 == 0:
                ctx.log(f"foundad step {step + 1}/{cfg.steps} loss {self.losses[-1]:.5f}")

    def _build(self, in_dim: int) -> Projector:
        cfg = self.config
        return Projector(in_dim, cfg.width, cfg.depth, cfg.heads).to(self.device)

    def predict(self, batch: Batch) -> Prediction:
        if self.projector is None:
            raise ZsadError("foundad: predict called before fit (no trained projector)")
        grid = self.grid(_images(batch))
        b, h, w, c = grid.shape
        tokens = grid.reshape(b, h * w, c)
        with torch.no_grad():
            res = patch_residuals(tokens, self.projector(tokens))
        size = self.backbone.image_size
        maps = F.interpolate(res.view(b, 1, h, w), size=(size, size), mode="bilinear", align_corners=False)
        return Prediction(maps[:, 0], top_k_mean(res, self.config.top_k))

    def state_dict(self) -> dict[str, Any]:
        if self.projector is None:
            return {}
        return {"in_dim": self.projector.embed.in_features, "projector": self.projector.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "projector" not in state:
            raise ZsadError("foundad: checkpoint holds no projector; delete it to refit")
        projector = self._build(int(state["in_dim"]))
        try:
            projector.load_state_dict(state["projector"])
        except RuntimeError:
            raise ZsadError("foundad: checkpoint projector does not match the configured width/depth") from None
        self.projector = projector

    def summary(self) -> dict[str, float]:
        return {"final_loss": self.losses[-1]} if self.losses else {}


def _images(batch: Batch) -> torch.Tensor:
    if batch.images is None:
        raise ZsadError("foundad: batch carries no images (the method needs_images)")
    return batch.images
