"""Pieces several methods share on their way from patch scores to anomaly maps and losses.

``gaussian_smooth`` is the per-image ``scipy.ndimage.gaussian_filter`` (reflect border, truncate 4)
that SPG, AnomalyCLIP, VisualAD and AnomalyDINO apply to their maps, in torch so it stays on the
maps' device; ``dice_loss`` is the smoothed soft Dice of their official segmentation losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's normalised 1-D Gaussian (radius ``int(truncate * sigma + 0.5)``), float64."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    phi = torch.exp(-0.5 / sigma**2 * x**2)
    return phi / phi.sum()


def _reflect_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Source indices of a line extended by ``radius`` on both sides with scipy's ``reflect`` rule."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_smooth(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Per-image 2-D Gaussian smoothing of ``(B, S, S)`` maps, equal to ``scipy.ndimage.gaussian_filter``
    (``mode='reflect'``, ``truncate=4``) applied to each map separately. ``sigma <= 0`` returns the input.
    """
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, truncate).to(device=maps.device, dtype=maps.dtype)
    radius = (kernel.numel() - 1) // 2
    out = maps
    for axis in (1, 2):
        n = out.shape[axis]
        padded = out.index_select(axis, _reflect_index(n, radius, out.device))
        moved = padded.movedim(axis, -1)
        lead = moved.shape[:-1]
        conv = F.conv1d(moved.reshape(-1, 1, moved.shape[-1]), kernel.view(1, 1, -1))
        out = conv.reshape(*lead, n).movedim(-1, axis)
    return out


def dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - mean_b (2 sum p y + 1) / (sum p + sum y + 1)`` over images ``(B, S, S)``."""
    y = target.to(prob.dtype)
    inter = (prob * y).flatten(1).sum(1)
    dice = (2 * inter + 1) / (prob.flatten(1).sum(1) + y.flatten(1).sum(1) + 1)
    return 1 - dice.mean()
