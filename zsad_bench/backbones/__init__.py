"""Backbones: importing this package registers every shipped backbone."""

from zsad_bench.backbones import effnet, hf, openclip
from zsad_bench.backbones.base import (
    BACKBONES,
    Backbone,
    Features,
    Preprocess,
    create_backbone,
    list_backbones,
    register_backbone,
)

__all__ = [
    "BACKBONES",
    "Backbone",
    "Features",
    "Preprocess",
    "create_backbone",
    "effnet",
    "hf",
    "list_backbones",
    "openclip",
    "register_backbone",
]
