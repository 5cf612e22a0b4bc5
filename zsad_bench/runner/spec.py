"""What a run is: :class:`RunSpec`, its JSON form, and the checks that need no weights or data."""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zsad_bench.detector import Detector, LearningType
from zsad_bench.errors import ZsadError
from zsad_bench.protocols import Leg

AUX_SPLITS = ("test", "train")


@dataclass
class RunSpec:
    """Everything that defines a run; see ``zsad-bench run --help`` for the meaning of each field."""

    method: str
    backbone: str | None = None
    protocol: str | None = "synthetic"
    aux: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    data_root: Path | None = None
    aux_categories: list[str] | None = None
    categories: list[str] | None = None
    aux_split: str = "test"
    shots: int | None = None
    seeds: list[int] = field(default_factory=lambda: [111])
    method_config: dict[str, Any] = field(default_factory=dict)
    preset: str = "paper"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    image_size: int | None = None
    eval_size: int | None = None
    device: str = "auto"
    batch_size: int = 8
    num_workers: int | None = None  # None: from the CPU count (zsad_bench.features.default_num_workers)
    precision: str = "fp32"
    deterministic: bool = False
    out: Path | None = None
    resume: bool = False
    label: str | None = None
    progress: bool = True
    use_cache: bool = True
    save_maps: int | None = None  # also save anomaly maps at this size beside the results (zsad_bench.viz.maps)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (paths as strings); ``backbone_kwargs`` must hold plain values."""
        data = dataclasses.asdict(self)
        for key in ("data_root", "out"):
            data[key] = None if data[key] is None else str(data[key])
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSpec:
        spec = cls(**data)
        spec.data_root = None if spec.data_root is None else Path(spec.data_root)
        spec.out = None if spec.out is None else Path(spec.out)
        return spec


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ZsadError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_learning_type(cls: type[Detector], legs: list[Leg], shots: int | None) -> None:
    """Refuse a protocol the method's learning type cannot run, with the reason."""
    lt = cls.learning_type
    if lt is LearningType.ZERO_SHOT:
        if shots is not None:
            raise ZsadError(f"method '{cls.name}' is zero-shot (trained on an auxiliary set); drop --shots")
        if any(not leg.aux for leg in legs):
            raise ZsadError(
                f"method '{cls.name}' is zero-shot and needs an auxiliary dataset (--aux DATASET or a named --protocol)"
            )
    elif lt is LearningType.TRAINING_FREE and shots is not None:
        raise ZsadError(f"method '{cls.name}' is training-free and uses no reference images; drop --shots")
    elif lt is LearningType.FEW_SHOT and shots is not None and shots < 1:
        raise ZsadError(f"--shots {shots}: a few-shot method needs at least 1 normal reference image")


def check_out_path(out: Path) -> None:
    """Refuse an ``--out`` that cannot be written, before any work: wrong suffix, a file as parent, no permission."""
    if out.suffix != ".json":
        raise ZsadError(f"--out {out}: results files end in .json (a .csv is written beside it)")
    if out.is_dir():
        raise ZsadError(f"--out {out}: is a directory; give a file name ending in .json")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ZsadError(f"--out {out}: {parent} is a file, not a directory; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ZsadError(f"--out {out}: {parent} is not writable; choose another --out")
