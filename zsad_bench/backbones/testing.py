"""Tiny randomly initialised configurations of the ViT backbones' architectures, for tests.

``create_backbone(name, config=tiny_config(name))`` goes through the same code path as the real
backbone (same upstream model class, token handling and position interpolation), weights aside.
Each keeps the real model's patch size and native position-table size, so running at the SPG sizes
(448, or 518 for CLIP) exercises the interpolation.
"""

from __future__ import annotations

from typing import Any

from zsad_bench.errors import ZsadError

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def tiny_config(name: str) -> Any:
    """Upstream config object for a tiny ``dinov2*``/``dinov3``/``siglip`` model, or an open_clip config dict.

    The CLIP text towers keeps CLIP's vocabulary (49408) and context (77) so open_clip's tokenizer
    works; widths are tiny (vision 64 with 2 heads, text 32 with 2 heads, joint embedding 16).
    """
    if name in ("dinov2", "dinov2-vits14", "dinov2-vitb14"):  # one architecture, three widths
        from transformers import Dinov2Config

        return Dinov2Config(**TINY, patch_size=14, image_size=518)
    if name == "dinov3":
        from transformers import DINOv3ViTConfig

        return DINOv3ViTConfig(**TINY, patch_size=16, image_size=224, num_register_tokens=4)
    if name == "siglip":
        from transformers import SiglipVisionConfig

        return SiglipVisionConfig(**TINY, patch_size=16, image_size=384)
    if name == "openclip":
        return {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 336, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
            "quick_gelu": True,
        }
    if name == "openclip-vitb16plus":  # ViT-B-16-plus-240: patch 16, 15x15 native grid, plain GELU
        return {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 240, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        }
    raise ZsadError(f"no tiny config for backbone '{name}'; choose one of {', '.join(TINY_BACKBONES)}")


TINY_BACKBONES = ("dinov2", "dinov2-vits14", "dinov2-vitb14", "dinov3", "siglip", "openclip", "openclip-vitb16plus")
