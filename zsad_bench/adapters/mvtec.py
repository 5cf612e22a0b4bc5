"""``mvtec:PATH`` (MVTec AD, canonical category order) and ``folder:PATH`` (any dataset in the MVTec layout)."""

from __future__ import annotations

from pathlib import Path

from zsad_bench.adapters._layout import MVTEC_CATEGORIES, load_mvtec_like
from zsad_bench.data import Dataset, register_dataset


@register_dataset("mvtec", "MVTec AD layout (<category>/train/good, test/<defect>, ground_truth/<defect>)")
def load_mvtec(root: Path) -> Dataset:
    """MVTec AD at ``root`` (or one of its category folders); known categories in the SPG order."""
    return load_mvtec_like(root, name="mvtec", kind="mvtec", layout="mvtec", known=MVTEC_CATEGORIES)


@register_dataset("folder", "any dataset in the MVTec AD layout; categories in alphabetical order")
def load_folder(root: Path) -> Dataset:
    """A user dataset in the MVTec layout at ``root`` (or a single category folder)."""
    return load_mvtec_like(root, name=root.name, kind="folder", layout="mvtec")
