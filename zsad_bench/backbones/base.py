"""The backbone interface: frozen patch-token grids, declared capabilities and the preprocessing that goes with them.

Layer names (shared interface #4): for ViTs ``"N"`` is the raw output of block N (1-based) and ``"N:norm"`` that
output passed through the backbone's final norm (as DINOv2's ``get_intermediate_layers(norm=True)``); CLIP towers
add ``"N:proj"`` (final norm, then the projection into the joint image-text space). Non-ViT backbones list their
own names (``Capabilities.extra_layers``). What a backbone can do is declared once, on its registry entry
(:class:`Capabilities`), so methods are checked against a backbone name without building the model
(:func:`check_method_backbone`).
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn

from zsad_bench.errors import ZsadError
from zsad_bench.registry import Registry

# Registered backbone names go into run ids and cache folder names and appear before ':' in the NAME:SIZE
# form of ablations: lower-case letters, digits, '.', '_' and '-' only.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")


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

    def layer(self, name: str | None = None) -> torch.Tensor:
        """The grid of ``name``, or of the only/last layer when ``name`` is None."""
        if name is None:
            return next(reversed(self.patches.values()))
        return self.patches[name]


@dataclass(frozen=True)
class Capabilities:
    """What a backbone offers, declared on its registry entry and honoured by the built model.

    ``num_blocks``: transformer blocks whose outputs are layers ``"1"`` .. ``"N"`` (None: not a ViT);
    ``normed_layers``: ``"N:norm"`` exists; ``projected_layers``: ``"N:proj"`` exists (CLIP);
    ``text``: a text tower (:class:`TextTower` through ``backbone.text``); ``token_insertion``: a
    :class:`VisionTower` (``backbone.tower``) whose token sequence a method may extend;
    ``global_token``: ``Features.global_token`` is set; ``extra_layers``: non-block layer names;
    ``default_layers``: what ``forward_features`` returns when asked for nothing.
    """

    num_blocks: int | None
    default_layers: tuple[str, ...]
    normed_layers: bool = False
    projected_layers: bool = False
    text: bool = False
    token_insertion: bool = False
    global_token: bool = True
    extra_layers: tuple[str, ...] = ()

    def layer_names(self) -> tuple[str, ...]:
        """Every accepted layer name (blocks from the last down, then their norm/proj forms, then extras)."""
        blocks = [str(i) for i in range(self.num_blocks or 0, 0, -1)]
        names = list(self.extra_layers) + blocks
        if self.normed_layers:
            names += [f"{b}:norm" for b in blocks]
        if self.projected_layers:
            names += [f"{b}:proj" for b in blocks]
        return tuple(names)

    def check_layers(self, layers: Sequence[str], who: str) -> tuple[str, ...]:
        """``layers`` as a tuple, or one :class:`ZsadError` line naming the accepted forms."""
        accepted = set(self.layer_names())
        bad = [name for name in layers if name not in accepted]
        if bad:
            if self.num_blocks is None:
                raise ZsadError(f"{who}: unknown layer(s) {bad}; choose from {list(self.extra_layers)}")
            forms = (
                '"N"' + (', "N:norm"' if self.normed_layers else "") + (', "N:proj"' if self.projected_layers else "")
            )
            raise ZsadError(f"{who}: unknown layer(s) {bad}; use block indices 1..{self.num_blocks} as {forms}")
        return tuple(layers)


def split_layer(name: str) -> tuple[int, str]:
    """``"12:norm"`` -> ``(12, "norm")``, ``"12"`` -> ``(12, "")`` (names already checked)."""
    block, _, form = name.partition(":")
    return int(block), form


class TextTower(Protocol):
    """A CLIP text tower, as text-prompted methods use it.

    ``encode_embeddings`` runs the tower from token embeddings: positions added, blocks run in order with
    ``before_block(i, x) -> x`` (0-based block index) called before each (AnomalyCLIP swaps learned tokens in
    there), final LayerNorm, pooling at the end-of-text token of ``tokens``, projection into the joint space.
    """

    width: int
    num_blocks: int

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor: ...

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def encode_embeddings(
        self,
        x: torch.Tensor,
        tokens: torch.Tensor,
        before_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor: ...

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...


class VisionTower(Protocol):
    """The token-insertion hook of a ViT: its token sequence, blocks and final norm, one step at a time.

    ``embed`` gives the ``(B, P + N, C)`` tokens entering block 1 (``P = num_prefix_tokens``: CLS and
    registers, then N patches); ``insert(x, extra)`` prepends ``extra`` ``(K, C)`` tokens, each given the
    CLS position embedding and the pre-block norm, if the tower has one; ``run_block(i, x)`` applies block
    ``i`` (1-based); ``final_norm`` is the final LayerNorm module; ``pool(x)`` turns the last block's tokens
    into the global token (CLIP: ``ln_post``, CLS, ``proj``).
    """

    width: int
    num_blocks: int
    num_prefix_tokens: int
    final_norm: nn.Module

    def embed(self, images: torch.Tensor) -> torch.Tensor: ...

    def insert(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor: ...

    def cls_position(self) -> torch.Tensor: ...

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor: ...

    def pool(self, x: torch.Tensor) -> torch.Tensor: ...


class Backbone(nn.Module, ABC):
    """A frozen feature extractor.

    Subclasses set ``name``, ``patch_size``, ``embed_dim`` (width of the default layer), ``preprocess``
    and ``capabilities`` (those of the built model: a tiny test config has fewer blocks than the registry's
    declaration). ``text`` / ``tower`` are set when the capabilities say so.
    """

    name: str
    source: str
    patch_size: int
    embed_dim: int
    preprocess: Preprocess
    capabilities: Capabilities
    weights_id: str = "random"
    text: TextTower | None = None
    tower: VisionTower | None = None

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

    @property
    def default_layers(self) -> tuple[str, ...]:
        return self.capabilities.default_layers

    @property
    def layers(self) -> tuple[str, ...]:
        """Every layer name :meth:`forward_features` accepts."""
        return self.capabilities.layer_names()

    @property
    def has_text(self) -> bool:
        return self.capabilities.text

    def check_layers(self, layers: Sequence[str] | None) -> tuple[str, ...]:
        """``layers`` (default :attr:`default_layers`) checked against the capabilities."""
        return self.capabilities.check_layers(tuple(layers or self.default_layers), self.name)

    @abstractmethod
    def forward_features(self, images: torch.Tensor, layers: Sequence[str] | None = None) -> Features:
        """Token grids of ``layers`` (default :attr:`default_layers`) for preprocessed ``images``."""

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings ``(T, C_g)`` in the space of ``global_token`` (backbones with a text tower only)."""
        if self.text is None:
            raise ZsadError(f"backbone '{self.name}' has no text tower; text-prompted methods need a CLIP backbone")
        return self.text.encode(texts)


def check_image_size(who: str, image_size: int, multiple: int, what: str = "the patch size ") -> None:
    """Refuse an input size that is not a positive multiple of ``multiple`` (one line)."""
    if image_size <= 0 or image_size % multiple:
        raise ZsadError(f"{who}: --image-size {image_size} must be a multiple of {what}{multiple}")


@lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """First 16 hex digits of the file's SHA-256 (memoised on path, size and mtime)."""
    st = path.stat()
    return _file_digest(str(path), st.st_size, st.st_mtime_ns)


def weights_digest(files: Sequence[Path]) -> str:
    """Content id of weight files: the blob name for hub-cache files (it is their SHA-256), else a SHA-256."""
    parts = []
    for f in sorted(files):
        real = f.resolve()
        parts.append(real.name if real.parent.name == "blobs" and len(real.name) == 64 else file_digest(real))
    if len(parts) == 1:
        return parts[0][:16]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def params_digest(module: nn.Module) -> str:
    """SHA-1 prefix over a module's parameters and buffers: identifies randomly initialised weights."""
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "random-" + h.hexdigest()[:12]


@dataclass(frozen=True)
class BackboneSpec:
    """Registry entry: how to build a backbone, its one default input size and its declared capabilities."""

    name: str
    factory: Callable[..., Backbone]
    image_size: int
    source: str
    capabilities: Capabilities
    offline: bool = False

    @property
    def has_text(self) -> bool:
        return self.capabilities.text


BACKBONES: Registry[BackboneSpec] = Registry("backbone", "zsad_bench.backbones")


def register_backbone(
    name: str, image_size: int, source: str, capabilities: Capabilities, offline: bool = False
) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Decorator registering ``factory(weights, image_size, **kw) -> Backbone``; ``image_size`` is the one default."""
    if not NAME_PATTERN.fullmatch(name):
        raise ZsadError(f"backbone name '{name}' must match {NAME_PATTERN.pattern} (it goes into file names)")

    def deco(factory: Callable[..., Backbone]) -> Callable[..., Backbone]:
        BACKBONES.register(name, BackboneSpec(name, factory, image_size, source, capabilities, offline))
        return factory

    return deco


def create_backbone(name: str, weights: str | None = None, image_size: int | None = None, **kw: Any) -> Backbone:
    """Build backbone ``name`` (frozen, eval mode) at ``image_size`` (default: the registry's) from local weights."""
    spec = BACKBONES.get(name)
    model = spec.factory(weights=weights, image_size=image_size or spec.image_size, **kw)
    model.eval().requires_grad_(False)
    return model


def list_backbones(pattern: str = "*") -> list[BackboneSpec]:
    return [s for _, s in BACKBONES.items(pattern)]


def backbone_capabilities(name: str) -> Capabilities:
    """Declared capabilities of registered backbone ``name`` (nothing is built)."""
    return BACKBONES.get(name).capabilities


def built_capabilities(declared: Capabilities, num_blocks: int | None) -> Capabilities:
    """``declared`` for a model with ``num_blocks`` blocks (tiny test configs): default layers renumbered."""
    if declared.num_blocks is None or num_blocks == declared.num_blocks:
        return declared
    last = str(declared.num_blocks)
    defaults = tuple(
        str(num_blocks) + name[len(last) :] if split_layer(name)[0] == declared.num_blocks else name
        for name in declared.default_layers
    )
    return replace(declared, num_blocks=num_blocks, default_layers=defaults)


def check_method_backbone(method_cls: type, backbone_name: str) -> None:
    """Refuse, in one line and without building anything, a backbone whose capabilities a method lacks.

    Reads from the method class: ``supported_backbones`` (explicit list or None), ``needs_text`` (text tower),
    ``needs_token_insertion`` (:class:`VisionTower`), ``needs_blocks`` (a ViT) and the layers it asks for
    (``layers_for(capabilities)`` when defined, else ``feature_layers``), checked against the declared names.
    """
    check_method_capabilities(method_cls, BACKBONES.get(backbone_name).capabilities, backbone_name)


def check_method_capabilities(method_cls: type, caps: Capabilities | None, backbone_name: str) -> None:
    """:func:`check_method_backbone` against given capabilities (a built backbone's own; None: undeclared)."""
    name = getattr(method_cls, "name", method_cls.__name__)
    supported = getattr(method_cls, "supported_backbones", None)
    if supported is not None and backbone_name not in supported:
        raise ZsadError(
            f"method '{name}' does not run on backbone '{backbone_name}'; use --backbone {' or '.join(supported)}"
        )
    if caps is None:  # a stand-in backbone that declares nothing: only the explicit list applies
        return
    wanted = [
        (getattr(method_cls, "needs_text", False) and not caps.text, "a text tower"),
        (getattr(method_cls, "needs_token_insertion", False) and not caps.token_insertion, "token insertion"),
        (getattr(method_cls, "needs_blocks", False) and caps.num_blocks is None, "transformer blocks"),
    ]
    missing = [what for lacking, what in wanted if lacking]
    if missing:
        fits = backbones_for(method_cls)
        raise ZsadError(
            f"method '{name}' does not run on backbone '{backbone_name}': it needs {' and '.join(missing)}; "
            f"use --backbone {' or '.join(fits) or '(none registered)'}"
        )
    layers_for = getattr(method_cls, "layers_for", None)
    layers = layers_for(caps) if callable(layers_for) else getattr(method_cls, "feature_layers", None)
    if layers:
        caps.check_layers(layers, f"method '{name}' on backbone '{backbone_name}'")


def backbones_for(method_cls: type) -> list[str]:
    """Registered backbones whose declared capabilities give ``method_cls`` what it needs (for ``list methods``)."""
    supported = getattr(method_cls, "supported_backbones", None)
    return [
        s.name
        for s in list_backbones()
        if _offers(s.capabilities, method_cls) and (supported is None or s.name in supported)
    ]


def _offers(caps: Capabilities, method_cls: type) -> bool:
    return (
        (caps.text or not getattr(method_cls, "needs_text", False))
        and (caps.token_insertion or not getattr(method_cls, "needs_token_insertion", False))
        and (caps.num_blocks is not None or not getattr(method_cls, "needs_blocks", False))
    )
