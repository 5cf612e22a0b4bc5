"""Scanning of the MVTec AD folder layout, shared by the mvtec, folder, visa and synthetic adapters.

Layout of one category::

    <category>/train/good/*.png
    <category>/test/good/*.png
    <category>/test/<defect>/*.png
    <category>/ground_truth/<defect>/<stem>_mask.png   (or <stem>.png)

Every folder under ``train/`` and ``test/`` named ``good`` holds normal images; any other folder
holds anomalous images, each of which must have a mask in ``ground_truth/<defect>/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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


def subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


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
    return {p.stem: p for p in sorted(folder.iterdir()) if is_image(p)}


def scan_category(cat_dir: Path, category: str) -> list[Sample]:
    """All samples of one MVTec-layout category folder, in :func:`sample_order`."""
    samples: list[Sample] = []
    for split in SPLITS:
        split_dir = cat_dir / split
        if not split_dir.is_dir():
            continue
        for kind_dir in subdirs(split_dir):
            defect = kind_dir.name
            images = sorted(p for p in kind_dir.iterdir() if is_image(p))
            if defect == GOOD:
                samples += [Sample(p, category, NORMAL, None, GOOD, split) for p in images]
                continue
            gt_dir = cat_dir / "ground_truth" / defect
            masks = _mask_index(gt_dir)
            for p in images:
                mask = masks.get(f"{p.stem}_mask") or masks.get(p.stem)
                if mask is None:
                    raise DataError(
                        f"{p}: anomalous image has no mask (looked for {gt_dir}/{p.stem}_mask.png and "
                        f"{gt_dir}/{p.stem}.png); add the mask or remove the image"
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
