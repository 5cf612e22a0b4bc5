"""Backbones: importing this package registers every shipped backbone."""

from zsad_bench.backbones import effnet, hf, openclip
from zsad_bench.backbones.base import (
    BACKBONES,
    Backbone,
    Capabilities,
    Features,
    Preprocess,
    TextTower,
    VisionTower,
    backbone_capabilities,
    backbones_for,
    check_method_backbone,
    create_backbone,
    list_backbones,
    register_backbone,
)

__all__ = [
    "BACKBONES",
    "Backbone",
    "Capabilities",
    "Features",
    "Preprocess",
    "TextTower",
    "VisionTower",
    "backbone_capabilities",
    "backbones_for",
    "check_method_backbone",
    "create_backbone",
    "effnet",
    "hf",
    "list_backbones",
    "openclip",
    "register_backbone",
]
