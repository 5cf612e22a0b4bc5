"""DINOv3, DINOv2 and SigLIP ViT-L backbones through Hugging Face ``transformers`` (SPG.md §2.2).

Layers are 1-based block indices (``"24"`` = final block of ViT-L). Token semantics:

* final layer: ``dinov3`` = ``last_hidden_state`` (after the final LayerNorm, as the SPG release gets it
  with transformers 4.56.1), ``dinov2`` = raw last-block output (before the final LayerNorm),
  ``siglip`` = last block -> ``post_layernorm`` (= ``last_hidden_state``);
* earlier layers: the raw block output (``hidden_states[i]``) for all three.

CLS and register tokens are removed from the grid. The global token is the pooled output: the
final-normed CLS for the DINOs, the attention-pool head for SigLIP. Position handling at other sizes
is the library's own: RoPE (DINOv3), bicubic table interpolation (DINOv2, SigLIP with
``interpolate_pos_encoding=True``).

Preprocessing (plain resize to S x S, then normalise): DINOv3 bilinear antialiased + ImageNet mean/std
(PIL's resize standing in for the HF fast processor's antialiased tensor resize), DINOv2 bicubic +
ImageNet mean/std, SigLIP bicubic + mean = std = 0.5.

Weights are read only from disk (``local_files_only=True``): ``--weights DIR`` (a folder with
``config.json``) or the Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``). Missing weights raise one :class:`ZsadError` line; no network call.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from zsad_bench.backbones.base import Backbone, Features, Preprocess, register_backbone
from zsad_bench.backbones.effnet import file_digest, params_digest
from zsad_bench.errors import ZsadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV3_REPO = "facebook/dinov3-vitl16-pretrain-lvd1689m"
DINOV2_REPO = "facebook/dinov2-large"
SIGLIP_REPO = "google/siglip-large-patch16-384"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache as the user configured it, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def weights_digest(files: Sequence[Path]) -> str:
    """Content id of weight files: the blob name for hub-cache files (it is their SHA-256), else a SHA-256."""
    parts = []
    for f in sorted(files):
        real = f.resolve()
        parts.append(real.name if real.parent.name == "blobs" and len(real.name) == 64 else file_digest(real))
    if len(parts) == 1:
        return parts[0][:16]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


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
    """A transformers ViT; subclasses define which tokens a layer yields. ``.model`` is the HF module."""

    def __init__(
        self, model: torch.nn.Module, weights_id: str, image_size: int, preprocess: Preprocess, source: str
    ) -> None:
        super().__init__()
        cfg = model.config
        self.model = model
        self.weights_id = weights_id
        self.source = source
        self.patch_size = int(cfg.patch_size)
        if image_size % self.patch_size:
            raise ZsadError(
                f"{self.name}: --image-size {image_size} must be a multiple of the patch size {self.patch_size}"
            )
        self.preprocess = preprocess
        self.embed_dim = int(cfg.hidden_size)
        self.num_layers = int(cfg.num_hidden_layers)
        self.layers = tuple(str(i) for i in range(self.num_layers, 0, -1))
        self.default_layers = (str(self.num_layers),)

    num_prefix_tokens = 1

    def _outputs(self, images: torch.Tensor) -> Any:
        return self.model(pixel_values=images, output_hidden_states=True)

    def _final_tokens(self, out: Any) -> torch.Tensor:
        return out.last_hidden_state

    def forward_features(self, images: torch.Tensor, layers: Sequence[str] | None = None) -> Features:
        """Grids ``(B, S/P, S/P, C)`` of ``layers`` (default: final block) and the pooled global token."""
        layers = tuple(layers or self.default_layers)
        bad = [name for name in layers if name not in self.layers]
        if bad:
            raise ZsadError(f"{self.name}: unknown layer(s) {bad}; use block indices 1..{self.num_layers}")
        b, _, h, w = images.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        out = self._outputs(images)
        patches = {}
        for name in layers:
            i = int(name)
            tokens = self._final_tokens(out) if i == self.num_layers else out.hidden_states[i]
            patches[name] = tokens[:, self.num_prefix_tokens :].reshape(b, gh, gw, -1).float()
        return Features(patches, out.pooler_output.float())


class DINOv3(HFViT):
    name = "dinov3"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.num_prefix_tokens = 1 + int(self.model.config.num_register_tokens)


class DINOv2(HFViT):
    name = "dinov2"

    def _final_tokens(self, out: Any) -> torch.Tensor:
        return out.hidden_states[self.num_layers]


class SigLIP(HFViT):
    name = "siglip"
    num_prefix_tokens = 0

    def _outputs(self, images: torch.Tensor) -> Any:
        return self.model(pixel_values=images, output_hidden_states=True, interpolate_pos_encoding=True)


def _build(
    cls: type[HFViT],
    model_cls_name: str,
    repo_id: str,
    how_to_get: str,
    preprocess: Preprocess,
    weights: str | None,
    config: Any,
    kw: dict[str, Any],
) -> HFViT:
    if kw:
        raise ZsadError(f"{cls.name}: unknown option(s) {sorted(kw)}")
    folder = None if config is not None else resolve_hf_folder(cls.name, repo_id, weights, how_to_get)
    import transformers  # after the weights check, so that a missing-weights error comes at once

    model_cls = getattr(transformers, model_cls_name)
    if folder is None:
        model = model_cls(config)
        model.eval()
        return cls(model, params_digest(model), preprocess.size, preprocess, f"random {type(config).__name__}")
    model, digest = load_hf_model(cls.name, model_cls, folder)
    return cls(model, digest, preprocess.size, preprocess, f"transformers {repo_id}")


@register_backbone("dinov3", image_size=448, source=f"transformers {DINOV3_REPO} (gated)")
def dinov3(weights: str | None = None, image_size: int | None = None, config: Any = None, **kw: Any) -> HFViT:
    """DINOv3 ViT-L/16 at 448; ``config`` (a ``DINOv3ViTConfig``) builds a random model instead."""
    pre = Preprocess(image_size or 448, IMAGENET_MEAN, IMAGENET_STD, resize="bilinear")
    how = (
        f"accept the licence at https://huggingface.co/{DINOV3_REPO}, run `hf auth login`, "
        f"then `hf download {DINOV3_REPO}`"
    )
    return _build(DINOv3, "DINOv3ViTModel", DINOV3_REPO, how, pre, weights, config, kw)


@register_backbone("dinov2", image_size=448, source=f"transformers {DINOV2_REPO}")
def dinov2(weights: str | None = None, image_size: int | None = None, config: Any = None, **kw: Any) -> HFViT:
    """DINOv2 ViT-L/14 at 448; ``config`` (a ``Dinov2Config``) builds a random model instead."""
    pre = Preprocess(image_size or 448, IMAGENET_MEAN, IMAGENET_STD, resize="bicubic")
    return _build(DINOv2, "Dinov2Model", DINOV2_REPO, f"run `hf download {DINOV2_REPO}`", pre, weights, config, kw)


@register_backbone("siglip", image_size=448, source=f"transformers {SIGLIP_REPO}")
def siglip(weights: str | None = None, image_size: int | None = None, config: Any = None, **kw: Any) -> HFViT:
    """SigLIP-L/16-384 vision tower at 448; ``config`` (a ``SiglipVisionConfig``) builds a random model instead."""
    pre = Preprocess(image_size or 448, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize="bicubic")
    return _build(
        SigLIP, "SiglipVisionModel", SIGLIP_REPO, f"run `hf download {SIGLIP_REPO}`", pre, weights, config, kw
    )
