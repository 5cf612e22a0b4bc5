"""Deep dataset validation: decodes every image and mask and collects every problem at once.

Opening a dataset only checks its structure (files exist, masks for all or none of a category's
anomalous images); :func:`check_dataset` reads the pixels: unreadable, truncated or oversized
files, masks whose size differs from their image (after EXIF orientation), anomalous images with an
empty mask, masks that are not binary, duplicate samples (e.g. a repeated VisA CSV row), a category
with masks for only some anomalous images, and categories without normal or anomalous test images.

:func:`validate` is the one validator of both ``zsad-bench run`` and ``zsad-bench data check``: the
same checks, raising on the first error. :func:`check_aux_supervision` refuses an auxiliary set a
zero-shot method cannot learn from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from zsad_bench.data.io import (
    HIGH_BIT_DEPTH_MODES,
    image_header,
    load_image,
    mask_values,
    max_pixels,
    samples_fingerprint,
)
from zsad_bench.data.records import ANOMALOUS, Dataset, Sample
from zsad_bench.errors import DataError
from zsad_bench.paths import cache_dir
from zsad_bench.results import atomic_write_bytes

ERROR = "error"
WARNING = "warning"
GREY_WARN = 0.001  # fraction of mask pixels strictly between 0 and the mask's maximum
GREY_ERROR = 0.5  # fraction of the foreground that is grey: a soft image, not a mask
ROLES = ("target", "auxiliary")
CHECK_VERSION = 2  # bump when the checks change: remembered validations are redone


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


def _decode_mask(path: Path) -> tuple[np.ndarray | None, Problem | None]:
    """Raw values of the mask at ``path`` as an (H, W) array, or the problem reading it."""
    try:
        return mask_values(path), None
    except DataError as exc:
        return None, Problem(ERROR, path, str(exc).removeprefix(f"{path}: "))


def _check_mask(s: Sample, image_shape: tuple[int, ...] | None) -> list[Problem]:
    assert s.mask_path is not None
    mask, problem = _decode_mask(s.mask_path)
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


def _check_sample(s: Sample) -> tuple[list[Problem], bool]:
    """Problems of one sample, and whether its image is high-bit-depth (decoded by range scaling)."""
    found: list[Problem] = []
    try:
        shape: tuple[int, ...] | None = np.asarray(load_image(s.image_path)).shape[:2]
        header = image_header(s.image_path)
    except DataError as exc:
        found.append(Problem(ERROR, s.image_path, str(exc).removeprefix(f"{s.image_path}: ")))
        shape, header = None, None
    if header is not None and header.orientation != 1:
        found.append(
            Problem(
                WARNING,
                s.image_path,
                f"EXIF orientation {header.orientation}: the image is decoded as a viewer shows it "
                "(rotated/flipped); its mask must be drawn on the displayed image",
            )
        )
    if s.mask_path is not None:
        found += _check_mask(s, shape)
    return found, header is not None and header.mode in HIGH_BIT_DEPTH_MODES


def _structure(ds: Dataset, role: str) -> tuple[dict[str, dict[str, dict[str, int]]], list[Problem]]:
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for s in ds.samples:
        c = counts.setdefault(s.category, {}).setdefault(s.split, {"normal": 0, "anomalous": 0})
        c["anomalous" if s.label == ANOMALOUS else "normal"] += 1
    found: list[Problem] = []
    keys = Counter(s.key for s in ds.samples)
    for s in ds.samples:
        if keys[s.key] > 1:
            found.append(Problem(ERROR, s.image_path, f"duplicate sample key {s.key}; rename one of the images"))
    for cat in counts:
        anomalous = [s for s in ds.samples if s.category == cat and s.label == ANOMALOUS]
        without = [s for s in anomalous if s.mask_path is None]
        if without and len(without) < len(anomalous):
            found += [
                Problem(
                    ERROR,
                    s.image_path,
                    f"anomalous image has no mask, but {len(anomalous) - len(without)} other anomalous images of "
                    f"category '{cat}' have one; add its mask or drop the image",
                )
                for s in without
            ]
        elif without:
            found.append(
                Problem(
                    WARNING,
                    ds.root,
                    f"category '{cat}' has image labels only (no masks); pixel metrics will not be computed for it",
                )
            )
    if role == "target":
        for cat, splits in counts.items():
            test = splits.get("test", {"normal": 0, "anomalous": 0})
            for kind in ("normal", "anomalous"):
                if test[kind] == 0:
                    found.append(
                        Problem(WARNING, ds.root, f"category '{cat}' has no {kind} test images; its AUROC is undefined")
                    )
    return counts, found


def check_dataset(ds: Dataset, progress: bool = True, role: str = "target") -> CheckReport:
    """Decode every image and mask of ``ds`` and report every problem found (never raises for bad data).

    ``role`` is ``"target"`` (warns about categories without normal or anomalous test images) or
    ``"auxiliary"`` (a training set: any split).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    counts, problems = _structure(ds, role)
    workers = min(4, os.cpu_count() or 1)
    high_bit_depth = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_check_sample, ds.samples)
        for found, scaled in tqdm(results, total=len(ds), desc=f"checking {ds.name}", unit="img", disable=not progress):
            problems += found
            high_bit_depth += scaled
    if high_bit_depth:
        problems.append(
            Problem(
                WARNING,
                ds.root,
                f"{high_bit_depth} image{'s are' if high_bit_depth != 1 else ' is'} 16-bit or float: each is scaled "
                "by its own min..max to 8 bits (uniform brightness differences between images are not kept)",
            )
        )
    return CheckReport(ds.name, ds.root, counts, problems)


def _memo_path(ds: Dataset, role: str) -> Path:
    key = json.dumps([CHECK_VERSION, role, max_pixels(), samples_fingerprint(ds.samples)])
    return cache_dir() / "validated" / f"{hashlib.sha1(key.encode()).hexdigest()}.json"


def validate(ds: Dataset, *, role: str, progress: bool = False) -> CheckReport:
    """The one dataset validator of ``run`` and ``data check``: :func:`check_dataset`, raising on errors.

    Raises a one-line :class:`DataError` naming the first error's file, with the number of further
    errors (``zsad-bench data check`` lists them all). Returns the report (its ``warnings`` are worth
    logging). A passed validation is remembered under the cache dir, keyed by
    :func:`samples_fingerprint` (paths, sizes and mtimes of every image and mask), so an unchanged
    dataset is decoded once, not on every run.
    """
    memo = _memo_path(ds, role)
    try:
        saved = json.loads(memo.read_text(encoding="utf-8"))
        problems = [Problem(p["level"], Path(p["path"]), p["message"]) for p in saved["problems"]]
        return CheckReport(ds.name, ds.root, saved["counts"], problems)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not validated yet (or an unreadable memo): validate
    report = check_dataset(ds, progress=progress, role=role)
    errors = report.errors
    if errors:
        first = errors[0]
        more = len(errors) - 1
        tail = f" ({more} more error{'s' * (more != 1)}: zsad-bench data check lists them all)" if more else ""
        raise DataError(f"{first.path}: {first.message} [{role} dataset {ds.name}]{tail}")
    payload = {
        "counts": report.counts,
        "problems": [{"level": p.level, "path": str(p.path), "message": p.message} for p in report.problems],
    }
    with contextlib.suppress(OSError):  # the memo only saves time; validation itself has passed
        atomic_write_bytes(memo, json.dumps(payload).encode(), durable=False)
    return report


def check_aux_supervision(ds: Dataset, needs_masks: bool) -> None:
    """Refuse an auxiliary set a method cannot learn anomalies from, with the reason.

    Zero-shot methods train on the anomalous images of the auxiliary set: it needs some, and when
    ``needs_masks`` every anomalous image needs its pixel mask (no image-label-only category).
    """
    splits = ", ".join(sorted({s.split for s in ds.samples}))
    anomalous = [s for s in ds.samples if s.label == ANOMALOUS]
    if not anomalous:
        hint = (
            "the train split of MVTec-style datasets holds normal images only; use --aux-split test"
            if splits == "train"
            else "use an auxiliary set with anomalous images"
        )
        raise DataError(
            f"{ds.root}: the auxiliary set {ds.name} (split {splits}) has no anomalous images, so the method "
            f"would train on zero positives; {hint}"
        )
    if needs_masks:
        unmasked = list(dict.fromkeys(s.category for s in anomalous if s.mask_path is None))
        if unmasked:
            raise DataError(
                f"{ds.root}: auxiliary categor{'y' if len(unmasked) == 1 else 'ies'} {', '.join(unmasked)} "
                f"of {ds.name} {'has' if len(unmasked) == 1 else 'have'} image labels only (no masks), but the "
                "method learns from anomalous pixels; drop them with --aux-categories or add their masks"
            )
