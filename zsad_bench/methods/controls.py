"""Controls: floors a real method must clear (listed apart, never marked best in a table).

* ``control-random``: a seeded random scorer. Each image gets a uniform random score and a uniform
  random map, drawn from a generator seeded by ``seed`` and the image path, so results do not depend on
  batching or order. Its expected image/pixel AUROC is 0.5: anything near it learned nothing.
* ``control-featnorm``: each patch scored by how far its feature norm lies from the median norm of its
  image's patches, ``| ||f_p|| - median_q ||f_q|| |``; the patch grid is bilinearly upsampled to the input
  size and the image score is the map's maximum. It uses no reference, no text and no training: it
  measures how much of a method's score the backbone's token statistics alone explain (an
  ``effnet-lite0`` run of this idea scored image/pixel AUROC 92.0/81.9 on the real MVTec AD bottle subset).

A third control is a preset of a real method: ``--preset control`` on ``spg`` trains no guides
(``guide_epochs=0``; see :mod:`zsad_bench.presets`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from zsad_bench.detector import Batch, Detector, LearningType, Prediction, register_method
from zsad_bench.errors import ZsadError


@register_method
class RandomControl(Detector):
    """Seeded random scores and maps (see module docstring)."""

    name = "control-random"
    display_name = "Random (control)"
    learning_type = LearningType.TRAINING_FREE
    paper = "control: uniform random scores (expected AUROC 0.5)"
    is_control: ClassVar[bool] = True
    needs_images = True  # reads nothing of the image, but spares the runner a feature extraction

    @dataclass
    class Config:
        seed: int = field(default=0, metadata={"inference": True, "ge": 0, "help": "random seed"})

    def _generator(self, path: object) -> torch.Generator:
        key = zlib.crc32(str(path).encode()) ^ (self.config.seed * 0x9E3779B1 & 0xFFFFFFFF)
        return torch.Generator().manual_seed(key)

    def predict(self, batch: Batch) -> Prediction:
        size = self.backbone.image_size
        maps, scores = [], []
        for sample in batch.samples:
            gen = self._generator(sample.image_path)
            scores.append(torch.rand((), generator=gen))
            maps.append(torch.rand(size, size, generator=gen))
        return Prediction(torch.stack(maps), torch.stack(scores))


def featnorm_scores(grid: torch.Tensor) -> torch.Tensor:
    """``(B, h, w, C)`` token grids -> ``(B, h, w)``: distance of each patch's feature norm from its image's median."""
    norms = grid.float().norm(dim=-1)
    median = norms.flatten(1).quantile(0.5, dim=1)  # the middle of the two middle values for an even count
    return (norms - median[:, None, None]).abs()


@register_method
class FeatNormControl(Detector):
    """Feature-norm outlier scorer (see module docstring)."""

    name = "control-featnorm"
    display_name = "Feature norm (control)"
    learning_type = LearningType.TRAINING_FREE
    paper = "control: |feature norm - image median| per patch, no reference, no training"
    is_control: ClassVar[bool] = True

    @dataclass
    class Config:
        pass

    def predict(self, batch: Batch) -> Prediction:
        if batch.features is None:
            raise ZsadError("control-featnorm: batch carries no features")
        patch = featnorm_scores(batch.features.layer())
        size = self.backbone.image_size
        maps = F.interpolate(patch[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        return Prediction(maps, maps.flatten(1).max(dim=1).values)
