"""OpenCLIP backbones with their text towers: ``openclip`` and ``openclip-vitb16plus``.

* ``openclip``: OpenAI CLIP ViT-L/14@336px (open_clip ``ViT-L-14-336``, tag ``openai``, QuickGELU), default 518 px
  as in the SPG release (SPG.md §2.2); 24 blocks.
* ``openclip-vitb16plus``: open_clip ``ViT-B-16-plus-240`` trained on LAION-400M (tag ``laion400m_e31``),
  default 240 px (15x15 patches): WinCLIP's paper backbone (anomalib ``winclip/torch_model.py`` BACKBONE/PRETRAINED);
  12 blocks.

At another input size the position table is bilinearly interpolated to the requested grid (CLS entry kept,
``align_corners=False``) and written back into the model, so the model then runs at that size only (37x37 at
518 for ViT-L/14). Layers (shared interface #4): ``"N"`` = raw output of block N (1-based, width of the tower),
``"N:norm"`` = that output through ``ln_post``, ``"N:proj"`` = ``ln_post`` then the projection ``proj`` into the
joint image-text space (the default, for the last block: SPG's final-layer tokens and AnomalyCLIP's
intermediate-layer convention). The global token is ``ln_post(CLS) @ proj`` of the final block, i.e.
``model.encode_image`` (unnormalised), in the space of :meth:`ClipTextTower.encode` (also unnormalised:
L2-normalise both before taking cosines). ``backbone.tower`` (:class:`ClipVisionTower`) and ``backbone.text``
(:class:`ClipTextTower`) are what CLIP methods use instead of the open_clip model.

Weights are looked up on disk only: ``--weights`` (a checkpoint file or a folder holding one), else open_clip's
own download locations: the Hugging Face cache entry (``timm/...``) and ``~/.cache/clip/<release file>``.
"""

from __future__ import annotations

import copy
import math
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zsad_bench.backbones.base import (
    Backbone,
    Capabilities,
    Features,
    Preprocess,
    built_capabilities,
    check_image_size,
    params_digest,
    register_backbone,
    split_layer,
    weights_digest,
)
from zsad_bench.backbones.hf import hf_cache_dir
from zsad_bench.errors import ZsadError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class ClipRelease:
    """One open_clip model + pretrained tag, and where its weights are cached on disk."""

    model_name: str
    tag: str
    hf_repo: str
    url_file: str  # file name of the release download in ~/.cache/clip
    quick_gelu: bool
    image_size: int
    capabilities: Capabilities

    @property
    def source(self) -> str:
        return f"open_clip {self.model_name} pretrained='{self.tag}'"

    @property
    def how_to_get(self) -> str:
        return (
            f"download them once with `python -c \"import open_clip; open_clip.create_model('{self.model_name}', "
            f"pretrained='{self.tag}')\"`"
        )


def _clip_caps(blocks: int) -> Capabilities:
    return Capabilities(
        num_blocks=blocks,
        default_layers=(f"{blocks}:proj",),
        normed_layers=True,
        projected_layers=True,
        text=True,
        token_insertion=True,
    )


RELEASES = {
    "openclip": ClipRelease(
        "ViT-L-14-336",
        "openai",
        "timm/vit_large_patch14_clip_336.openai",
        "ViT-L-14-336px.pt",
        True,
        518,
        _clip_caps(24),
    ),
    "openclip-vitb16plus": ClipRelease(
        "ViT-B-16-plus-240",
        "laion400m_e31",
        "timm/vit_base_patch16_plus_clip_240.laion400m_e31",
        "vit_b_16_plus_240-laion400m_e31-8fb26589.pt",
        False,
        240,
        _clip_caps(12),
    ),
}
# kept for callers of the former single-model module
MODEL_NAME = RELEASES["openclip"].model_name
HF_REPO = RELEASES["openclip"].hf_repo


class ClipVisionTower:
    """:class:`~zsad_bench.backbones.base.VisionTower` of an open_clip ``VisionTransformer`` (batch-first).

    Besides the protocol it offers the pieces of a residual block that DPAM (AnomalyCLIP) recombines:
    :meth:`attention_branches` and :meth:`mlp_branch`, and :meth:`project` into the joint space.
    """

    num_prefix_tokens = 1

    def __init__(self, visual: nn.Module) -> None:
        if not getattr(visual.transformer, "batch_first", True):
            raise ZsadError("openclip: needs batch-first open_clip transformers; upgrade open_clip_torch")
        self.visual = visual
        self.width = int(visual.class_embedding.shape[0])
        self.num_blocks = len(visual.transformer.resblocks)
        self.final_norm = visual.ln_post

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1+N, C)``: patch embedding, CLS, positions and ``ln_pre``, as the tokens enter block 1."""
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))
        b, c, gh, gw = x.shape
        x = x.reshape(b, c, gh * gw).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(b, 1, c)
        return v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))

    def cls_position(self) -> torch.Tensor:
        return self.visual.positional_embedding[0]

    def insert(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        tokens = self.visual.ln_pre(extra + self.cls_position()).to(x.dtype)
        return torch.cat([tokens.expand(x.shape[0], -1, -1), x], dim=1)

    def block(self, i: int) -> nn.Module:
        return self.visual.transformer.resblocks[i - 1]

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.block(i)(x)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """All blocks at once (``visual.transformer``), for sequences of any length (WinCLIP windows)."""
        return self.visual.transformer(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Joint-space embedding ``(B, D)`` from the last block's tokens (``ln_post``, CLS pool, ``proj``)."""
        pooled, _ = self.visual._pool(x)
        return self.project(pooled)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens @ self.visual.proj if self.visual.proj is not None else tokens

    def attention_branches(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``i``'s attention residual branch on ``x`` ``(B, L, C)``: q-k attention and v-v attention.

        Both see ``ln_1(x)`` and go through the block's output projection and ``ls_1``.
        """
        block = self.block(i)
        attn = block.attn
        h = block.ln_1(x)
        b, n, c = h.shape
        heads = attn.num_heads
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
        original = F.scaled_dot_product_attention(q, k, v)
        value_value = F.scaled_dot_product_attention(v, v, v)
        out = [block.ls_1(attn.out_proj(t.transpose(1, 2).reshape(b, n, c))) for t in (original, value_value)]
        return out[0], out[1]

    def mlp_branch(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``i``'s MLP residual branch ``ls_2(mlp(ln_2(x)))``."""
        block = self.block(i)
        return block.ls_2(block.mlp(block.ln_2(x)))


class ClipTextTower:
    """:class:`~zsad_bench.backbones.base.TextTower` of an open_clip ``CLIP`` model."""

    def __init__(self, model: nn.Module) -> None:
        import open_clip

        self.model = model
        self.width = int(model.token_embedding.weight.shape[1])
        self.num_blocks = len(model.transformer.resblocks)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.model.token_embedding.weight.device)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(tokens)

    def encode_embeddings(
        self,
        x: torch.Tensor,
        tokens: torch.Tensor,
        before_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        m = self.model
        x = x + m.positional_embedding.to(x.dtype)
        for i, block in enumerate(m.transformer.resblocks):
            if before_block is not None:
                x = before_block(i, x)
            x = block(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        return x @ m.text_projection

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Unnormalised text embeddings ``(T, D)`` (open_clip ``encode_text``), comparable to ``global_token``."""
        return self.model.encode_text(self.tokenize(texts), normalize=False).float()


class OpenCLIP(Backbone):
    """open_clip ``CLIP`` (``.model``) exposing patch tokens, the image embedding and its text tower."""

    def __init__(self, name: str, model: nn.Module, weights_id: str, image_size: int) -> None:
        super().__init__()
        release = RELEASES[name]
        visual = model.visual
        self.name = name
        self.source = release.source
        self.model = model
        self.weights_id = weights_id
        self.patch_size = int(visual.patch_size[0])
        check_image_size(name, image_size, self.patch_size)
        self.preprocess = Preprocess(image_size, OPENAI_MEAN, OPENAI_STD, resize="bicubic")
        self.embed_dim = int(visual.proj.shape[1])
        resize_position_table(visual, image_size // self.patch_size)
        self.tower = ClipVisionTower(visual)
        self.text = ClipTextTower(model)
        self.capabilities = built_capabilities(release.capabilities, self.tower.num_blocks)

    def forward_features(self, images: torch.Tensor, layers: Sequence[str] | None = None) -> Features:
        """Grids ``(B, S/P, S/P, C)`` of ``layers`` (default: final block, projected) and the image embedding."""
        layers = self.check_layers(layers)
        v = self.model.visual
        b, _, h, w = images.shape
        if (h, w) != tuple(v.image_size):
            raise ZsadError(f"{self.name}: built for {v.image_size[0]}px inputs, got {h}x{w}; create it with that size")
        last = self.tower.num_blocks
        x = self.tower.embed(images)
        wanted = {split_layer(name)[0] for name in layers}
        raw: dict[int, torch.Tensor] = {}
        for i in range(1, last + 1):
            x = self.tower.run_block(i, x)
            if i in wanted or i == last:
                raw[i] = x
        grid = h // self.patch_size, w // self.patch_size
        patches = {}
        for name in layers:
            i, form = split_layer(name)
            tokens = raw[i][:, 1:]
            if form:
                tokens = v.ln_post(tokens)
            if form == "proj":
                tokens = tokens @ v.proj
            patches[name] = tokens.reshape(b, *grid, -1).float()
        global_token = v.ln_post(raw[last][:, 0]) @ v.proj
        return Features(patches, global_token.float())


def resize_position_table(visual: nn.Module, grid: int) -> None:
    """Bilinearly resample the vision position table (CLS kept) to ``grid x grid`` in place, as SPG does."""
    table = visual.positional_embedding.detach()
    old = math.isqrt(table.shape[0] - 1)
    if old != grid:
        spatial = table[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
        spatial = F.interpolate(spatial, size=(grid, grid), mode="bilinear", align_corners=False)
        table = torch.cat([table[:1], spatial.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)])
        visual.positional_embedding = nn.Parameter(table, requires_grad=False)
    visual.grid_size = (grid, grid)
    visual.image_size = (grid * visual.patch_size[0], grid * visual.patch_size[1])


def find_checkpoint(weights: str | None, name: str = "openclip") -> Path:
    """The checkpoint file to load: ``weights`` (file or folder) or open_clip's cached download of ``name``."""
    release = RELEASES[name]
    names = (*HF_FILES, release.url_file)
    if weights:
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        found = [path / n for n in names if (path / n).is_file()] if path.is_dir() else []
        if not found:
            raise ZsadError(
                f"{name}: --weights {weights} is neither a checkpoint file nor a folder holding one of "
                f"{', '.join(names)}"
            )
        return found[0]
    from huggingface_hub import try_to_load_from_cache

    cache = hf_cache_dir()
    for filename in HF_FILES:
        hit = try_to_load_from_cache(release.hf_repo, filename, cache_dir=str(cache))
        if isinstance(hit, str):
            return Path(hit)
    url_cache = Path("~/.cache/clip").expanduser() / release.url_file
    if url_cache.is_file():
        return url_cache
    raise ZsadError(
        f"{name}: {release.model_name} '{release.tag}' weights not found (looked in the Hugging Face cache {cache} "
        f"for {release.hf_repo} and in {url_cache}); {release.how_to_get}, or pass --weights FILE"
    )


def load_clip_weights(model: nn.Module, path: Path, model_name: str = MODEL_NAME) -> None:
    """Strictly load an open_clip checkpoint or an OpenAI TorchScript archive into ``model``."""
    import open_clip

    try:
        if zipfile.is_zipfile(path) and _is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the way in
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
                state.pop(key, None)
            model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        else:
            open_clip.load_checkpoint(model, str(path), strict=True)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines()] or [type(exc).__name__]
        detail = lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]
        raise ZsadError(f"openclip: cannot load {path} as {model_name} weights ({detail[:300]})") from None


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") for name in zf.namelist())


def _build(name: str, weights: str | None, image_size: int, config: Any, kw: dict[str, Any]) -> OpenCLIP:
    if kw:
        raise ZsadError(f"{name}: unknown option(s) {sorted(kw)}")
    release = RELEASES[name]
    path = None if config is not None else find_checkpoint(weights, name)
    import open_clip  # after the weights check, so that a missing-weights error comes at once

    if path is None:
        model = open_clip.CLIP(**copy.deepcopy(config)).eval()
        return OpenCLIP(name, model, params_digest(model), image_size)
    cfg = open_clip.get_model_config(release.model_name)
    model = open_clip.CLIP(**{**cfg, "quick_gelu": release.quick_gelu}).eval()
    load_clip_weights(model, path, release.model_name)
    return OpenCLIP(name, model, weights_digest([path]), image_size)


def _register(name: str) -> Callable[[Callable[..., OpenCLIP]], Callable[..., OpenCLIP]]:
    r = RELEASES[name]
    return register_backbone(name, image_size=r.image_size, source=r.source, capabilities=r.capabilities)


@_register("openclip")
def openclip(weights: str | None, image_size: int, config: Any = None, **kw: Any) -> OpenCLIP:
    """OpenAI CLIP ViT-L/14@336; ``config`` (an open_clip model-config dict) builds a random model instead."""
    return _build("openclip", weights, image_size, config, kw)


@_register("openclip-vitb16plus")
def openclip_vitb16plus(weights: str | None, image_size: int, config: Any = None, **kw: Any) -> OpenCLIP:
    """OpenCLIP ViT-B-16-plus-240 (LAION-400M, epoch 31); ``config`` builds a random model instead."""
    return _build("openclip-vitb16plus", weights, image_size, config, kw)
