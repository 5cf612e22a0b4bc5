"""Few-shot fit scope: one fit per target category (default) or one per target dataset on every category's shots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from zsad_bench.detector import Batch, Detector, LearningType, Prediction, register_method
from zsad_bench.runner import RunSpec, run_experiment


@register_method
class _ScopeProbe(Detector):
    """Records the categories of the references each fit gets; scores images by their mean feature."""

    name = "test-fit-scope"
    learning_type = LearningType.FEW_SHOT
    fits: ClassVar[list[list[str]]] = []

    @dataclass
    class Config:
        scope: str = "category"

    @property
    def fit_scope(self) -> str:
        return self.config.scope

    def fit(self, data, ctx) -> None:
        type(self).fits.append(sorted(s.category for s in data.samples))
        self.ref = [s.category for s in data.samples]

    def state_dict(self) -> dict:
        return {"ref": torch.tensor([len(self.ref)])}

    def load_state_dict(self, state: dict) -> None:
        self.ref = ["?"] * int(state["ref"][0])

    def predict(self, batch: Batch) -> Prediction:
        grid = batch.features.layer()
        size = self.backbone.image_size
        maps = grid.mean(-1, keepdim=True).permute(0, 3, 1, 2)
        maps = torch.nn.functional.interpolate(maps, size=(size, size), mode="bilinear")[:, 0]
        return Prediction(maps, maps.flatten(1).amax(1))


@pytest.mark.parametrize(
    ("scope", "expected"), [("category", [["cap"], ["capsule"]]), ("dataset", [["cap", "capsule"]])]
)
def test_fit_scope_decides_what_each_fit_gets(tmp_path: Path, scope: str, expected: list[list[str]]) -> None:
    _ScopeProbe.fits.clear()
    result, _ = run_experiment(
        RunSpec(
            "test-fit-scope", backbone="effnet-lite0", protocol=None, targets=["synthetic:objects"],
            categories=["cap", "capsule"], image_size=64, method_config={"scope": scope},
            out=tmp_path / "r.json", progress=False,
        )
    )  # fmt: skip
    assert _ScopeProbe.fits == expected  # dataset scope: one fit on the 1 shot of each category run
    assert [r.category for r in result.records] == ["cap", "capsule"]
