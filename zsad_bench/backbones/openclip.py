"""``openclip``: OpenAI CLIP ViT-L/14@336px through ``open_clip`` (tag ``openai``) at 518, with its text tower.

As in the SPG release (SPG.md §2.2): the 24x24 position table is bilinearly interpolated to the
requested grid (CLS entry kept, ``align_corners=False``) and written back into the model, so the model
then runs at that size only (37x37 at 518). Tokens of block ``i`` (1-based) are the raw block output
followed by ``ln_post`` and the projection ``proj`` (1024 -> 768), for every layer — the final-layer
semantics of SPG and the intermediate-layer convention of AnomalyCLIP. The global token is
``ln_post(CLS) @ proj`` of the final block, i.e. ``model.encode_image`` (unnormalised), in the same space as
:meth:`OpenCLIP.encode_text` (also unnormalised: L2-normalise both before taking cosines).

Weights are looked up on disk only: ``--weights`` (a checkpoint file or a folder holding one), else
open_clip's own download locations: the Hugging Face cache entry ``timm/vit_large_patch14_clip_336.openai``
and ``~/.cache/clip/ViT-L-14-336px.pt`` (the OpenAI TorchScript archive, also accepted).
"""

from __future__ import annotations

import copy
import math
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zsad_bench.backbones.base import Backbone, Features, Preprocess, register_backbone
from zsad_bench.backbones.effnet import params_digest
from zsad_bench.backbones.hf import hf_cache_dir, weights_digest
from zsad_bench.errors import ZsadError

MODEL_NAME = "ViT-L-14-336"
HF_REPO = "timm/vit_large_patch14_clip_336.openai"
CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "ViT-L-14-336px.pt")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SIZE = 518
SOURCE = f"open_clip {MODEL_NAME} pretrained='openai' (OpenAI CLIP weights)"
HOW_TO_GET = (
    f"download them once with `python -c \"import open_clip; open_clip.create_model('{MODEL_NAME}', "
    "pretrained='openai')\"`"
)


class OpenCLIP(Backbone):
    """open_clip ``CLIP`` (``.model``) exposing projected patch tokens, the image embedding and text embeddings."""

    name = "openclip"
    source = SOURCE
    has_text = True

    def __init__(self, model: nn.Module, weights_id: str, image_size: int = DEFAULT_SIZE) -> None:
        super().__init__()
        import open_clip

        visual = model.visual
        self.model = model
        self.weights_id = weights_id
        self.patch_size = int(visual.patch_size[0])
        if image_size % self.patch_size:
            raise ZsadError(
                f"openclip: --image-size {image_size} must be a multiple of the patch size {self.patch_size}"
            )
        self.preprocess = Preprocess(image_size, OPENAI_MEAN, OPENAI_STD, resize="bicubic")
        self.embed_dim = int(visual.proj.shape[1])
        self.num_layers = len(visual.transformer.resblocks)
        self.layers = tuple(str(i) for i in range(self.num_layers, 0, -1))
        self.default_layers = (str(self.num_layers),)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
        resize_position_table(visual, image_size // self.patch_size)

    def forward_features(self, images: torch.Tensor, layers: Sequence[str] | None = None) -> Features:
        """Projected grids ``(B, S/14, S/14, D)`` of ``layers`` (default: final block) and the image embedding."""
        layers = tuple(layers or self.default_layers)
        bad = [name for name in layers if name not in self.layers]
        if bad:
            raise ZsadError(f"openclip: unknown layer(s) {bad}; use block indices 1..{self.num_layers}")
        v = self.model.visual
        b, _, h, w = images.shape
        if (h, w) != tuple(v.image_size):
            raise ZsadError(f"openclip: built for {v.image_size[0]}px inputs, got {h}x{w}; create it with that size")
        x = v.conv1(images.to(v.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(b, 1, -1)
        x = v.ln_pre(torch.cat([cls, x], 1) + v.positional_embedding.to(x.dtype))
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        wanted = {int(name) for name in layers}
        raw: dict[int, torch.Tensor] = {}
        for i, block in enumerate(v.transformer.resblocks, start=1):
            x = block(x)
            if i in wanted or i == self.num_layers:
                raw[i] = x if batch_first else x.transpose(0, 1)
        grid = h // self.patch_size, w // self.patch_size
        patches = {}
        for name in layers:
            tokens = v.ln_post(raw[int(name)][:, 1:]) @ v.proj
            patches[name] = tokens.reshape(b, *grid, -1).float()
        global_token = v.ln_post(raw[self.num_layers][:, 0]) @ v.proj
        return Features(patches, global_token.float())

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Unnormalised text embeddings ``(T, D)`` (open_clip ``encode_text``), comparable to ``global_token``."""
        tokens = self.tokenizer(list(texts)).to(self.model.token_embedding.weight.device)
        return self.model.encode_text(tokens, normalize=False).float()


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


def find_checkpoint(weights: str | None) -> Path:
    """The checkpoint file to load: ``weights`` (file or folder) or open_clip's cached download."""
    if weights:
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        found = [path / n for n in CHECKPOINT_NAMES if (path / n).is_file()] if path.is_dir() else []
        if not found:
            raise ZsadError(
                f"openclip: --weights {weights} is neither a checkpoint file nor a folder holding one of "
                f"{', '.join(CHECKPOINT_NAMES)}"
            )
        return found[0]
    from huggingface_hub import try_to_load_from_cache

    cache = hf_cache_dir()
    for filename in CHECKPOINT_NAMES[:2]:
        hit = try_to_load_from_cache(HF_REPO, filename, cache_dir=str(cache))
        if isinstance(hit, str):
            return Path(hit)
    url_cache = Path("~/.cache/clip").expanduser() / CHECKPOINT_NAMES[2]
    if url_cache.is_file():
        return url_cache
    raise ZsadError(
        f"openclip: {MODEL_NAME} 'openai' weights not found (looked in the Hugging Face cache {cache} for {HF_REPO} "
        f"and in {url_cache}); {HOW_TO_GET}, or pass --weights FILE"
    )


def load_clip_weights(model: nn.Module, path: Path) -> None:
    """Strictly load an open_clip checkpoint or the OpenAI TorchScript archive into ``model``."""
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
        raise ZsadError(f"openclip: cannot load {path} as {MODEL_NAME} weights ({detail[:300]})") from None


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") for name in zf.namelist())


@register_backbone("openclip", image_size=DEFAULT_SIZE, source=SOURCE, has_text=True)
def openclip(weights: str | None = None, image_size: int | None = None, config: Any = None, **kw: Any) -> OpenCLIP:
    """OpenAI CLIP ViT-L/14@336 at 518; ``config`` (an open_clip model-config dict) builds a random model instead."""
    if kw:
        raise ZsadError(f"openclip: unknown option(s) {sorted(kw)}")
    size = image_size or DEFAULT_SIZE
    path = None if config is not None else find_checkpoint(weights)
    import open_clip  # after the weights check, so that a missing-weights error comes at once

    if path is None:
        model = open_clip.CLIP(**copy.deepcopy(config)).eval()
        return OpenCLIP(model, params_digest(model), size)
    cfg = open_clip.get_model_config(MODEL_NAME)
    model = open_clip.CLIP(**{**cfg, "quick_gelu": True}).eval()
    load_clip_weights(model, path)
    return OpenCLIP(model, weights_digest([path]), size)
