"""Test doubles shared by method tests."""

from __future__ import annotations

from zsad_bench.backbones.base import Backbone, Features, Preprocess


class GridBackbone(Backbone):
    """Stand-in backbone: only its input size matters to methods that read cached features."""

    name = "grid-stub"
    patch_size = 4
    default_layers = ("last",)

    def __init__(self, size: int, embed_dim: int = 6) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.preprocess = Preprocess(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def forward_features(self, images, layers=None) -> Features:
        raise AssertionError("features of these tests come from memory, never from the backbone")
