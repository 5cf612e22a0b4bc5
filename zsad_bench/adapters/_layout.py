"""Scanning of the MVTec AD folder layout, shared by the mvtec, folder, visa and synthetic adapters.

Layout of one category::

    <category>/train/good/*.png
    <category>/test/good/*.png
    <category>/test/<defect>/*.png
    <category>/ground_truth/<defect>/<stem>_mask.png   (or <stem>.png)

Every folder under ``train/`` and ``test/`` named ``good`` holds normal images; any other folder
holds anomalous images, each with a mask in ``ground_truth/<defect>/``. A category without any
mask (no ``ground_truth/`` folder) is image-label-only: image metrics only. Non-regular entries
with an image name (FIFOs, devices, broken links, symlink loops) are refused: reading them would
block or fail later.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from zsad_bench.data.io import check_regular_file
from zsad_bench.data.records import ANOMALOUS, NORMAL, Dataset, Sample
from zsad_bench.errors import DataError

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
SPLITS = ("train", "test")
GOOD = "good"

MVTEC_CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
VISA_CATEGORIES = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def require_dir(path: Path, what: str = "dataset root") -> Path:
    """``path`` if it is a folder; a one-line :class:`DataError` if it is a file or cannot be read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} does not exist; check the path") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the {what} ({exc.strerror}); fix the path or its permissions") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DataError(f"{path}: the {what} is a file, not a folder; pass the folder that holds the dataset")
    return path


def listdir(folder: Path) -> list[Path]:
    """Entries of ``folder`` sorted by name; an unreadable folder is a one-line :class:`DataError`."""
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder ({exc.strerror}); fix its permissions") from None


def image_files(folder: Path) -> list[Path]:
    """Image files of ``folder`` sorted by name; an entry with an image name that is not a regular file
    (FIFO, device, broken link, symlink loop) is a :class:`DataError`: reading it would block or fail."""
    found = []
    for p in listdir(folder):
        if not is_image(p):
            continue
        try:
            regular = stat.S_ISREG(os.stat(p).st_mode)
        except OSError as exc:
            raise DataError(f"{p}: cannot read it ({exc.strerror}); fix or remove the file") from None
        if not regular:
            raise DataError(f"{p}: not a regular file (a folder, FIFO, socket or device); remove it from the dataset")
        found.append(p)
    return found


def subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted by name."""
    return [p for p in listdir(folder) if p.is_dir() and not p.name.startswith(".")]


def sample_order(s: Sample) -> tuple[int, int, str, str]:
    """Canonical order inside a category: train before test, normal first, then defect, then path."""
    return (SPLITS.index(s.split) if s.split in SPLITS else len(SPLITS), s.label, s.defect_type, str(s.image_path))


def order_categories(names: Sequence[str], known: Sequence[str] = ()) -> list[str]:
    """``known`` names first in their canonical order, then the others alphabetically."""
    rank = {c: i for i, c in enumerate(known)}
    return sorted(names, key=lambda c: (0, rank[c], "") if c in rank else (1, 0, c))


def is_category_dir(folder: Path) -> bool:
    return any((folder / split).is_dir() for split in SPLITS)


def category_dirs(root: Path, layout: str) -> list[Path]:
    """The category folders of an MVTec-like ``root``; ``root`` itself when it is one category."""
    require_dir(root)
    if is_category_dir(root):
        return [root]
    found = [d for d in subdirs(root) if is_category_dir(d)]
    if not found:
        hint = ""
        if (root / "split_csv" / "1cls.csv").is_file():
            hint = "; it looks like VisA: use visa:PATH"
        elif (root / "meta.json").is_file():
            hint = "; it has a meta.json: use meta:PATH"
        raise DataError(
            f"{root}: not a {layout} dataset; looked for {root}/<category>/train|test/ and {root}/train|test/ "
            f"(MVTec AD layout: <category>/train/good, test/<defect>, ground_truth/<defect>){hint}"
        )
    return found


def _mask_index(folder: Path) -> dict[str, Path]:
    """Mask files of one ``ground_truth/<defect>`` folder by stem."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in image_files(folder)}


def scan_category(cat_dir: Path, category: str) -> list[Sample]:
    """All samples of one MVTec-layout category folder, in :func:`sample_order`.

    Without a ``ground_truth/`` folder the category is image-label-only (anomalous images get no
    mask); with one, every anomalous image must have its mask.
    """
    samples: list[Sample] = []
    labelled = (cat_dir / "ground_truth").is_dir()
    for split in SPLITS:
        split_dir = cat_dir / split
        if not split_dir.is_dir():
            continue
        for kind_dir in subdirs(split_dir):
            defect = kind_dir.name
            images = image_files(kind_dir)
            if defect == GOOD:
                samples += [Sample(p, category, NORMAL, None, GOOD, split) for p in images]
                continue
            gt_dir = cat_dir / "ground_truth" / defect
            masks = _mask_index(gt_dir)
            for p in images:
                mask = masks.get(f"{p.stem}_mask") or masks.get(p.stem)
                if mask is None and labelled:
                    raise DataError(
                        f"{p}: anomalous image has no mask (looked for {gt_dir}/{p.stem}_mask.png and "
                        f"{gt_dir}/{p.stem}.png); add the mask or remove the image (or remove "
                        f"{cat_dir / 'ground_truth'} for image labels only)"
                    )
                samples.append(Sample(p, category, ANOMALOUS, mask, defect, split))
    if not samples:
        raise DataError(
            f"{cat_dir}: category '{category}' has no images (looked in {cat_dir}/train/<kind>/ and "
            f"{cat_dir}/test/<kind>/ for {', '.join(sorted(IMAGE_EXTS))}); add images or remove the folder"
        )
    return sorted(samples, key=sample_order)


def load_mvtec_like(
    root: Path, *, name: str, kind: str, layout: str, known: Sequence[str] = (), meta: dict[str, str] | None = None
) -> Dataset:
    """A :class:`Dataset` from an MVTec-layout ``root`` (several categories or a single category folder)."""
    dirs = {d.name: d for d in category_dirs(root, layout)}
    samples = [s for c in order_categories(list(dirs), known) for s in scan_category(dirs[c], c)]
    return Dataset(name, root, samples, kind, {"layout": layout, **(meta or {})})


def listed_file(where: str, base: Path, rel: str, what: str, root_name: str = "dataset root") -> Path:
    """``base / rel`` of an index file's entry, checked to be a regular file (a FIFO or device would block the
    read). ``where`` opens the error line: ``"meta.json: test/widget[0]"`` or ``"1cls.csv line 7:"``."""
    path = base / rel
    if not rel or not os.path.lexists(path):
        raise DataError(f"{where} {what} file {path} does not exist; check the {root_name}")
    try:
        check_regular_file(path, what)
    except DataError as exc:
        raise DataError(f"{where.rstrip(':')}: {exc}") from None
    return path
