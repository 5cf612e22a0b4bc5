"""DINOv3, DINOv2 (ViT-S/B/L) and SigLIP backbones through Hugging Face ``transformers`` (SPG.md §2.2).

Layers (shared interface #4): ``"N"`` = raw output of block N (``hidden_states[N]``, 1-based), ``"N:norm"`` =
that output through the model's final LayerNorm (DINOv2 ``get_intermediate_layers(norm=True)``); for the last
block ``"N:norm"`` is the library's own ``last_hidden_state``. Defaults keep the SPG release's tokens:
``dinov3`` ``"24:norm"`` (``last_hidden_state`` as the release gets it with transformers 4.56.1), ``dinov2``
``"24"`` (raw last block), ``siglip`` ``"24:norm"`` (``post_layernorm``). Variants ``dinov2-vits14`` and
``dinov2-vitb14`` (12 blocks) default to their raw last block, like ``dinov2``.

CLS and register tokens are removed from the grid. The global token is the pooled output: the
final-normed CLS for the DINOs, the attention-pool head for SigLIP. Position handling at other sizes
is the library's own: RoPE (DINOv3), bicubic table interpolation (DINOv2, SigLIP with
``interpolate_pos_encoding=True``). DINOv2 also offers the token-insertion hook (:class:`DinoTower`).

Preprocessing (plain resize to S x S, then normalise): DINOv3 bilinear antialiased + ImageNet mean/std
(PIL's resize standing in for the HF fast processor's antialiased tensor resize), DINOv2 bicubic +
ImageNet mean/std, SigLIP bicubic + mean = std = 0.5.

Weights are read only from disk (``local_files_only=True``): ``--weights DIR`` (a folder with
``config.json``) or the Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``). Missing weights raise one :class:`ZsadError` line; no network call.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

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
from zsad_bench.errors import ZsadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV3_REPO = "facebook/dinov3-vitl16-pretrain-lvd1689m"
DINOV2_REPO = "facebook/dinov2-large"
DINOV2_VARIANTS = {"dinov2-vits14": "facebook/dinov2-small", "dinov2-vitb14": "facebook/dinov2-base"}
SIGLIP_REPO = "google/siglip-large-patch16-384"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache as the user configured it, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_hf_folder(name: str, repo_id: str, weights: str | None, how_to_get: str) -> Path:
    """Local folder holding ``config.json`` + weights of ``repo_id``; never touches the network."""
    if weights:
        folder = Path(weights).expanduser()
        if not (folder / "config.json").is_file():
            raise ZsadError(
                f"{name}: --weights {weights} is not a Hugging Face model folder (no config.json); "
                f"pass the folder of a downloaded {repo_id} snapshot"
            )
        return folder
    from huggingface_hub import try_to_load_from_cache

    cache = hf_cache_dir()
    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=str(cache))
    if not isinstance(found, str):
        raise ZsadError(
            f"{name}: weights of {repo_id} not found (looked in the Hugging Face cache {cache}; "
            f"honours HF_HOME/HF_HUB_CACHE); {how_to_get}, or pass --weights DIR"
        )
    return Path(found).parent


def load_hf_model(name: str, model_cls: type, folder: Path) -> tuple[torch.nn.Module, str]:
    """``model_cls.from_pretrained(folder)`` offline in float32, with its weights digest."""
    files = [f for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES]
    if not files:
        raise ZsadError(f"{name}: no weight file (*.safetensors, *.bin) in {folder}; re-download the model")
    try:
        model = model_cls.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ZsadError(f"{name}: cannot load weights from {folder} ({msg}); re-download the model") from None
    return model, weights_digest(files)


class HFViT(Backbone):
    """A transformers ViT; subclasses say where the final norm and prefix tokens are. ``.model`` is the HF module."""

    num_prefix_tokens = 1

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        weights_id: str,
        preprocess: Preprocess,
        source: str,
        declared: Capabilities,
    ) -> None:
        super().__init__()
        cfg = model.config
        self.name = name
        self.model = model
        self.weights_id = weights_id
        self.source = source
        self.patch_size = int(cfg.patch_size)
        check_image_size(name, preprocess.size, self.patch_size)
        self.preprocess = preprocess
        self.embed_dim = int(cfg.hidden_size)
        self.capabilities = built_capabilities(declared, int(cfg.num_hidden_layers))

    def _outputs(self, images: torch.Tensor) -> Any:
        return self.model(pixel_values=images, output_hidden_states=True)

    def _final_norm(self) -> torch.nn.Module:
        return self.model.layernorm

    def forward_features(self, images: torch.Tensor, layers: Sequence[str] | None = None) -> Features:
        """Grids ``(B, S/P, S/P, C)`` of ``layers`` (default: see module docstring) and the pooled global token."""
        layers = self.check_layers(layers)
        b, _, h, w = images.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        out = self._outputs(images)
        last = self.capabilities.num_blocks
        patches = {}
        for name in layers:
            i, form = split_layer(name)
            if not form:
                tokens = out.hidden_states[i]
            elif i == last:
                tokens = out.last_hidden_state
            else:
                tokens = self._final_norm()(out.hidden_states[i])
            patches[name] = tokens[:, self.num_prefix_tokens :].reshape(b, gh, gw, -1).float()
        return Features(patches, out.pooler_output.float())


class DINOv3(HFViT):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.num_prefix_tokens = 1 + int(self.model.config.num_register_tokens)

    def _final_norm(self) -> torch.nn.Module:
        return self.model.norm


class DinoTower:
    """:class:`~zsad_bench.backbones.base.VisionTower` of a transformers DINOv2 model."""

    num_prefix_tokens = 1

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.width = int(model.config.hidden_size)
        self.num_blocks = int(model.config.num_hidden_layers)
        self.final_norm = model.layernorm

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.model.embeddings
        return emb(images.to(emb.patch_embeddings.projection.weight.dtype))

    def cls_position(self) -> torch.Tensor:
        return self.model.embeddings.position_embeddings[0, 0]

    def insert(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        tokens = (extra + self.cls_position()).to(x.dtype)
        return torch.cat([tokens.expand(x.shape[0], -1, -1), x], dim=1)

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        out = self.model.encoder.layer[i - 1](x)
        return out[0] if isinstance(out, tuple) else out  # older transformers return tuples

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(x)[:, 0]


class DINOv2(HFViT):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.tower = DinoTower(self.model)


class SigLIP(HFViT):
    num_prefix_tokens = 0

    def _outputs(self, images: torch.Tensor) -> Any:
        return self.model(pixel_values=images, output_hidden_states=True, interpolate_pos_encoding=True)

    def _final_norm(self) -> torch.nn.Module:
        return self.model.post_layernorm


def _build(
    cls: type[HFViT],
    name: str,
    model_cls_name: str,
    repo_id: str,
    how_to_get: str,
    preprocess: Preprocess,
    weights: str | None,
    config: Any,
    kw: dict[str, Any],
) -> HFViT:
    if kw:
        raise ZsadError(f"{name}: unknown option(s) {sorted(kw)}")
    declared = BACKBONES_CAPS[name]
    folder = None if config is not None else resolve_hf_folder(name, repo_id, weights, how_to_get)
    import transformers  # after the weights check, so that a missing-weights error comes at once

    model_cls = getattr(transformers, model_cls_name)
    if folder is None:
        model = model_cls(config)
        model.eval()
        return cls(name, model, params_digest(model), preprocess, f"random {type(config).__name__}", declared)
    model, digest = load_hf_model(name, model_cls, folder)
    return cls(name, model, digest, preprocess, f"transformers {repo_id}", declared)


def _vit(blocks: int, default: str, token_insertion: bool = False) -> Capabilities:
    return Capabilities(
        num_blocks=blocks, default_layers=(default,), normed_layers=True, token_insertion=token_insertion
    )


BACKBONES_CAPS = {
    "dinov3": _vit(24, "24:norm"),
    "dinov2": _vit(24, "24", token_insertion=True),
    "dinov2-vits14": _vit(12, "12", token_insertion=True),
    "dinov2-vitb14": _vit(12, "12", token_insertion=True),
    "siglip": _vit(24, "24:norm"),
}


@register_backbone(
    "dinov3", image_size=448, source=f"transformers {DINOV3_REPO} (gated)", capabilities=BACKBONES_CAPS["dinov3"]
)
def dinov3(weights: str | None, image_size: int, config: Any = None, **kw: Any) -> HFViT:
    """DINOv3 ViT-L/16; ``config`` (a ``DINOv3ViTConfig``) builds a random model instead."""
    pre = Preprocess(image_size, IMAGENET_MEAN, IMAGENET_STD, resize="bilinear")
    how = (
        f"accept the licence at https://huggingface.co/{DINOV3_REPO}, run `hf auth login`, "
        f"then `hf download {DINOV3_REPO}`"
    )
    return _build(DINOv3, "dinov3", "DINOv3ViTModel", DINOV3_REPO, how, pre, weights, config, kw)


def _dinov2(name: str, repo: str, weights: str | None, image_size: int, config: Any, kw: dict[str, Any]) -> HFViT:
    pre = Preprocess(image_size, IMAGENET_MEAN, IMAGENET_STD, resize="bicubic")
    return _build(DINOv2, name, "Dinov2Model", repo, f"run `hf download {repo}`", pre, weights, config, kw)


@register_backbone(
    "dinov2", image_size=448, source=f"transformers {DINOV2_REPO}", capabilities=BACKBONES_CAPS["dinov2"]
)
def dinov2(weights: str | None, image_size: int, config: Any = None, **kw: Any) -> HFViT:
    """DINOv2 ViT-L/14; ``config`` (a ``Dinov2Config``) builds a random model instead."""
    return _dinov2("dinov2", DINOV2_REPO, weights, image_size, config, kw)


@register_backbone(
    "dinov2-vits14",
    image_size=448,
    source=f"transformers {DINOV2_VARIANTS['dinov2-vits14']}",
    capabilities=BACKBONES_CAPS["dinov2-vits14"],
)
def dinov2_vits14(weights: str | None, image_size: int, config: Any = None, **kw: Any) -> HFViT:
    """DINOv2 ViT-S/14 (AnomalyDINO's paper backbone); ``config`` builds a random model instead."""
    return _dinov2("dinov2-vits14", DINOV2_VARIANTS["dinov2-vits14"], weights, image_size, config, kw)


@register_backbone(
    "dinov2-vitb14",
    image_size=448,
    source=f"transformers {DINOV2_VARIANTS['dinov2-vitb14']}",
    capabilities=BACKBONES_CAPS["dinov2-vitb14"],
)
def dinov2_vitb14(weights: str | None, image_size: int, config: Any = None, **kw: Any) -> HFViT:
    """DINOv2 ViT-B/14; ``config`` builds a random model instead."""
    return _dinov2("dinov2-vitb14", DINOV2_VARIANTS["dinov2-vitb14"], weights, image_size, config, kw)


@register_backbone(
    "siglip", image_size=448, source=f"transformers {SIGLIP_REPO}", capabilities=BACKBONES_CAPS["siglip"]
)
def siglip(weights: str | None, image_size: int, config: Any = None, **kw: Any) -> HFViT:
    """SigLIP-L/16-384 vision tower; ``config`` (a ``SiglipVisionConfig``) builds a random model instead."""
    pre = Preprocess(image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize="bicubic")
    how = f"run `hf download {SIGLIP_REPO}`"
    return _build(SigLIP, "siglip", "SiglipVisionModel", SIGLIP_REPO, how, pre, weights, config, kw)
