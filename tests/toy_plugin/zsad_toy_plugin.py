"""A third-party-style plugin used by the tests: registered through an entry point of a fake distribution.

``toy-zeroshot`` learns, on the auxiliary set, the mean feature of normal patches; its anomaly map is
the distance of each patch to that mean. ``sleep`` slows predict() so a test can kill a run mid-way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from zsad_bench.detector import Batch, Detector, LearningType, Prediction, register_method


@register_method
class ToyZeroShot(Detector):
    name = "toy-zeroshot"
    display_name = "Toy"
    learning_type = LearningType.ZERO_SHOT
    paper = "test plugin"
    fits = 0  # number of fit() calls in this process (checkpoint reuse test)

    @dataclass
    class Config:
        sleep: float = field(default=0.0, metadata={"ge": 0.0, "inference": True, "help": "seconds per predict()"})
        noise: float = field(default=0.0, metadata={"ge": 0.0, "help": "std of the seeded perturbation of the fit"})

    def fit(self, data, ctx) -> None:
        type(self).fits += 1
        total, count = None, 0
        for batch in data.batches(4, shuffle=True, seed=ctx.seed, masks=True):
            grid = batch.features.layer()  # (B, h, w, C)
            h, w = grid.shape[1:3]
            normal = F.interpolate(batch.masks[:, None], size=(h, w), mode="area")[:, 0] < 0.5
            feats = grid[normal]
            total = feats.sum(0) if total is None else total + feats.sum(0)
            count += feats.shape[0]
        self.center = total / count
        # a seeded random perturbation, so determinism tests see the seed
        self.center = self.center + self.config.noise * torch.randn_like(self.center)

    def predict(self, batch: Batch) -> Prediction:
        if self.config.sleep:
            time.sleep(self.config.sleep)
        grid = batch.features.layer()
        dist = (grid - self.center).norm(dim=-1)
        size = self.backbone.image_size
        maps = F.interpolate(dist[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        return Prediction(maps, maps.flatten(1).amax(1))

    def state_dict(self) -> dict:
        return {"center": self.center}

    def load_state_dict(self, state: dict) -> None:
        self.center = state["center"]
