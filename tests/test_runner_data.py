"""Issue #11 end to end: label-only targets, one validator, aux supervision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsad_bench.errors import ZsadError
from zsad_bench.metrics import IMAGE_METRICS
from zsad_bench.runner import RunSpec, run_experiment


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _label_only_target(root: Path) -> Path:
    """``plain``: train/good 2, test/good 3, test/dent 3 and no ground_truth/ folder at all."""
    rng = np.random.default_rng(0)
    for split, kind, n in (("train", "good", 2), ("test", "good", 3), ("test", "dent", 3)):
        for i in range(n):
            img = rng.integers(80, 120, (32, 32, 3), dtype=np.uint8)
            if kind == "dent":
                img[8:20, 8:20] = 250
            _png(root / "plain" / split / kind / f"{i}.png", img)
    return root


def test_image_label_only_target_gets_image_metrics_only(tmp_path: Path) -> None:
    target = _label_only_target(tmp_path / "data")
    result, _ = run_experiment(
        RunSpec(
            "toy-zeroshot",
            protocol=None,
            aux=["synthetic:textures"],
            targets=[f"folder:{target}"],
            out=tmp_path / "r.json",
            progress=False,
        )
    )
    (record,) = result.records
    assert record.category == "plain" and record.n_images == 6
    assert set(record.metrics) == set(IMAGE_METRICS)  # pixel metrics absent, not NaN
    assert all(0.0 <= v <= 1.0 for v in record.metrics.values())
    assert result.config["run"]["decoding"]["exif_orientation"].startswith("applied")


def test_run_validates_like_data_check(tmp_path: Path) -> None:
    target = _label_only_target(tmp_path / "data")
    gt = target / "plain" / "ground_truth" / "dent"
    for i in range(3):
        _png(gt / f"{i}_mask.png", np.zeros((40, 32), np.uint8))  # drawn at another size
    with pytest.raises(ZsadError, match=r"0_mask.png: mask is 32x40 but its image 0.png is 32x32"):
        run_experiment(
            RunSpec("toy-zeroshot", None, None, ["synthetic:textures"], [f"folder:{target}"], progress=False)
        )


def test_aux_train_split_is_refused_for_a_zero_shot_method(tmp_path: Path) -> None:
    with pytest.raises(ZsadError, match=r"no anomalous images.*zero positives.*--aux-split test"):
        run_experiment(RunSpec("toy-zeroshot", aux_split="train", out=tmp_path / "r.json", progress=False))
