"""The backbone interface: frozen patch-token grids plus the preprocessing that goes with them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn

from zsad_bench.errors import ZsadError
from zsad_bench.registry import Registry


@dataclass(frozen=True)
class Preprocess:
    """Image -> normalised (3, S, S) float tensor, as the backbone's release does it.

    ``resize`` names the interpolation of a plain (non aspect-preserving) resize to ``size``:
    ``"bicubic"``, ``"bilinear"`` (both antialiased, as PIL / the HF fast processors do).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "bicubic"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[self.resize]
        img = image.convert("RGB").resize((self.size, self.size), resample=resample)
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        t = t.permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (t - mean) / std


@dataclass
class Features:
    """Backbone output for a batch.

    ``patches`` maps a layer name to its token grid ``(B, h, w, C)`` (CLS/register tokens removed,
    row-major patch order). ``global_token`` is the image-level embedding ``(B, C_g)`` or None.
    """

    patches: dict[str, torch.Tensor]
    global_token: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def layer(self, name: str | None = None) -> torch.Tensor:
        """The grid of ``name``, or of the only/last layer when ``name`` is None."""
        if name is None:
            return next(reversed(self.patches.values()))
        return self.patches[name]


class Backbone(nn.Module, ABC):
    """A frozen feature extractor.

    Subclasses set ``name``, ``patch_size``, ``embed_dim`` (per-layer width of the default layer),
    ``layers`` (names accepted by :meth:`forward_features`, default first) and ``preprocess``.
    """

    name: str
    source: str
    patch_size: int
    embed_dim: int
    preprocess: Preprocess
    default_layers: tuple[str, ...]

    @property
    def image_size(self) -> int:
        return self.preprocess.size

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def identity(self) -> str:
        """String identifying weights + settings; part of every feature-cache key and checkpoint."""
        return f"{self.name}@{self.image_size}:{self.weights_id}"

    weights_id: str = "random"

    @abstractmethod
    def forward_features(self, images: torch.Tensor, layers: Sequence[str] | None = None) -> Features:
        """Token grids of ``layers`` (default :attr:`default_layers`) for preprocessed ``images``."""

    # CLIP-like backbones override these two; vision-only ones keep the defaults.
    has_text: bool = False

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings ``(T, C_g)`` in the space of ``global_token`` (CLIP-style backbones only)."""
        raise ZsadError(f"backbone '{self.name}' has no text tower; text-prompted methods need --backbone openclip")


@dataclass(frozen=True)
class BackboneSpec:
    """Registry entry: how to build a backbone and what ``list backbones`` shows about it."""

    name: str
    factory: Callable[..., Backbone]
    image_size: int
    source: str
    has_text: bool = False
    offline: bool = False


BACKBONES: Registry[BackboneSpec] = Registry("backbone", "zsad_bench.backbones")


def register_backbone(
    name: str, image_size: int, source: str, has_text: bool = False, offline: bool = False
) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Decorator registering ``factory(weights=None, image_size=None, **kw) -> Backbone``."""

    def deco(factory: Callable[..., Backbone]) -> Callable[..., Backbone]:
        BACKBONES.register(name, BackboneSpec(name, factory, image_size, source, has_text, offline))
        return factory

    return deco


def create_backbone(name: str, weights: str | None = None, image_size: int | None = None, **kw) -> Backbone:
    """Build backbone ``name`` (frozen, eval mode) from local ``weights`` or the user's caches."""
    spec = BACKBONES.get(name)
    model = spec.factory(weights=weights, image_size=image_size, **kw)
    model.eval().requires_grad_(False)
    return model


def list_backbones(pattern: str = "*") -> list[BackboneSpec]:
    return [s for _, s in BACKBONES.items(pattern)]
