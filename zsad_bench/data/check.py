"""Deep dataset validation: decodes every image and mask and collects every problem at once.

Opening a dataset only checks its structure (files exist, anomalous images have masks);
:func:`check_dataset` reads the pixels: unreadable or truncated files, masks whose size differs
from their image, anomalous images with an empty mask, masks that are not binary, duplicate
samples and categories without normal or anomalous test images.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from zsad_bench.data.io import load_image
from zsad_bench.data.records import ANOMALOUS, Dataset, Sample
from zsad_bench.errors import DataError

ERROR = "error"
WARNING = "warning"
GREY_WARN = 0.001  # fraction of mask pixels strictly between 0 and the mask's maximum
GREY_ERROR = 0.5  # fraction of the foreground that is grey: a soft image, not a mask


@dataclass(frozen=True)
class Problem:
    """One finding: ``level`` is ``"error"`` (unusable data) or ``"warning"`` (usable, but suspicious)."""

    level: str
    path: Path
    message: str

    def render(self) -> str:
        return f"{self.level.upper():7s}  {self.path}: {self.message}"


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`: every problem and image counts per category and split.

    ``counts[category][split]`` is ``{"normal": n, "anomalous": m}``.
    """

    dataset: str
    root: Path
    counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == WARNING]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    def render(self) -> str:
        """A human-readable report: the count table, the problems, then a one-line verdict."""
        rows = [
            [cat, split, c["normal"], c["anomalous"]]
            for cat, splits in self.counts.items()
            for split, c in splits.items()
        ]
        total = sum(c["normal"] + c["anomalous"] for splits in self.counts.values() for c in splits.values())
        lines = [
            f"dataset {self.dataset} at {self.root}: {total} images, {len(self.counts)} "
            f"categor{'y' if len(self.counts) == 1 else 'ies'}",
            tabulate(rows, headers=["category", "split", "normal", "anomalous"], tablefmt="simple"),
        ]
        if self.problems:
            lines += ["", "problems:"] + [p.render() for p in self.problems]
        n_err, n_warn = len(self.errors), len(self.warnings)
        verdict = "OK" if self.ok else "FAILED"
        lines += ["", f"{verdict}: {n_err} error{'s' * (n_err != 1)}, {n_warn} warning{'s' * (n_warn != 1)}"]
        return "\n".join(lines)


def _decode(path: Path) -> tuple[np.ndarray | None, Problem | None]:
    """Pixels of ``path`` as an (H, W) array (max over channels), or the problem reading it."""
    try:
        return np.asarray(load_image(path)).max(axis=-1), None
    except DataError as exc:
        return None, Problem(ERROR, path, str(exc).removeprefix(f"{path}: "))


def _check_mask(s: Sample, image_shape: tuple[int, ...] | None) -> list[Problem]:
    assert s.mask_path is not None
    if not s.mask_path.is_file():
        return [Problem(ERROR, s.mask_path, f"mask file not found (for {s.image_path.name}); restore it")]
    mask, problem = _decode(s.mask_path)
    if mask is None:
        return [problem] if problem else []
    found: list[Problem] = []
    if image_shape is not None and mask.shape != image_shape:
        found.append(
            Problem(
                ERROR,
                s.mask_path,
                f"mask is {mask.shape[1]}x{mask.shape[0]} but its image {s.image_path.name} is "
                f"{image_shape[1]}x{image_shape[0]}; masks must match their image size",
            )
        )
    top = int(mask.max())
    if top == 0:
        if s.label == ANOMALOUS:
            found.append(Problem(WARNING, s.mask_path, f"mask of anomalous image {s.image_path.name} is empty"))
        return found
    if s.label != ANOMALOUS:
        found.append(Problem(WARNING, s.mask_path, f"normal image {s.image_path.name} has a non-empty mask"))
    if top >= 128:  # 0/255-style mask; small-integer label masks (VisA: 0..6) are fine as they are
        grey = (mask > 0) & (mask < top)
        frac, frac_fg = float(grey.mean()), float(grey.sum() / max((mask > 0).sum(), 1))
        if frac_fg > GREY_ERROR:
            found.append(
                Problem(ERROR, s.mask_path, f"not a binary mask ({frac_fg:.0%} of its foreground is grey); use 0/255")
            )
        elif frac > GREY_WARN:
            found.append(
                Problem(
                    WARNING,
                    s.mask_path,
                    f"mask is not binary ({frac:.2%} of pixels between 0 and {top}, e.g. JPEG artefacts); "
                    "every value > 0 counts as defect",
                )
            )
    return found


def _check_sample(s: Sample) -> list[Problem]:
    image, problem = _decode(s.image_path)
    found = [problem] if problem else []
    shape = None if image is None else image.shape
    if s.mask_path is not None:
        found += _check_mask(s, shape)
    elif s.label == ANOMALOUS:
        found.append(Problem(ERROR, s.image_path, "anomalous image has no mask; add its mask or drop the image"))
    return found


def _structure(ds: Dataset) -> tuple[dict[str, dict[str, dict[str, int]]], list[Problem]]:
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for s in ds.samples:
        c = counts.setdefault(s.category, {}).setdefault(s.split, {"normal": 0, "anomalous": 0})
        c["anomalous" if s.label == ANOMALOUS else "normal"] += 1
    found: list[Problem] = []
    keys = Counter(s.key for s in ds.samples)
    for s in ds.samples:
        if keys[s.key] > 1:
            found.append(Problem(ERROR, s.image_path, f"duplicate sample key {s.key}; rename one of the images"))
    for cat, splits in counts.items():
        test = splits.get("test", {"normal": 0, "anomalous": 0})
        for kind in ("normal", "anomalous"):
            if test[kind] == 0:
                found.append(
                    Problem(WARNING, ds.root, f"category '{cat}' has no {kind} test images; its AUROC is undefined")
                )
    return counts, found


def check_dataset(ds: Dataset, progress: bool = True) -> CheckReport:
    """Decode every image and mask of ``ds`` and report every problem found (never raises for bad data)."""
    counts, problems = _structure(ds)
    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_check_sample, ds.samples)
        for found in tqdm(results, total=len(ds), desc=f"checking {ds.name}", unit="img", disable=not progress):
            problems += found
    return CheckReport(ds.name, ds.root, counts, problems)
