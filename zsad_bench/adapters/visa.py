"""``visa:PATH``: VisA, either the original release (``split_csv/1cls.csv``) or anomalib's converted layout.

Original layout (``PATH`` = the VisA root)::

    split_csv/1cls.csv                 columns object,split,label,image,mask (paths relative to PATH)
    <cat>/Data/Images/{Normal,Anomaly}/*.JPG
    <cat>/Data/Masks/Anomaly/*.png     values {0, 1}

anomalib layout (``PATH`` = the VisA root holding ``visa_pytorch/``, ``visa_pytorch`` itself, or one
category folder)::

    visa_pytorch/<cat>/train/good, test/good, test/bad, ground_truth/bad/<stem>.png   (0/255)

Both give the same sample keys: normal images are ``good``, anomalous ones ``bad``. A category whose
anomalous rows all leave ``mask`` empty (or, in the anomalib layout, that has no ``ground_truth/``)
is image-label-only; a category with some masks must have all of them.
"""

from __future__ import annotations

import csv
from pathlib import Path

from zsad_bench.adapters._layout import (
    SPLITS,
    VISA_CATEGORIES,
    is_category_dir,
    listed_file,
    load_mvtec_like,
    order_categories,
    require_dir,
    sample_order,
    subdirs,
)
from zsad_bench.data import ANOMALOUS, NORMAL, Dataset, Sample, register_dataset
from zsad_bench.errors import DataError

SPLIT_CSV = Path("split_csv") / "1cls.csv"
CSV_COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": NORMAL, "anomaly": ANOMALOUS}


def _load_csv(root: Path) -> Dataset:
    csv_path = root / SPLIT_CSV
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: cannot read the VisA split file ({exc}); re-copy it") from None
    if not rows or tuple(c.strip() for c in rows[0]) != CSV_COLUMNS:
        found = ",".join(rows[0]) if rows else "an empty file"
        raise DataError(f"{csv_path}: header must be {','.join(CSV_COLUMNS)}, found {found}; use VisA's 1cls.csv")
    by_cat: dict[str, list[Sample]] = {}
    unmasked: dict[str, int] = {}  # category -> line of its first anomalous row without a mask
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(CSV_COLUMNS):
            raise DataError(f"{csv_path} line {line}: expected {len(CSV_COLUMNS)} columns, found {len(row)}")
        cat, split, label, image, mask = (c.strip() for c in row)
        if split not in SPLITS:
            raise DataError(f"{csv_path} line {line}: split '{split}' is not one of {', '.join(SPLITS)}")
        if label not in LABELS:
            raise DataError(f"{csv_path} line {line}: label '{label}' is not one of {', '.join(LABELS)}")
        image_path = listed_file(f"{csv_path} line {line}:", root, image, "image", "VisA root")
        mask_path = None
        if LABELS[label] == ANOMALOUS:
            if mask:
                mask_path = listed_file(f"{csv_path} line {line}:", root, mask, "mask", "VisA root")
            else:
                unmasked.setdefault(cat, line)
        defect = "bad" if LABELS[label] == ANOMALOUS else "good"
        by_cat.setdefault(cat, []).append(Sample(image_path, cat, LABELS[label], mask_path, defect, split))
    if not by_cat:
        raise DataError(f"{csv_path}: lists no images; use VisA's split_csv/1cls.csv")
    for cat, line in unmasked.items():
        if any(s.mask_path is not None for s in by_cat[cat]):
            raise DataError(
                f"{csv_path} line {line}: anomalous image has no mask column value, but other anomalous images of "
                f"'{cat}' have masks; add its mask (a category has masks for all its anomalous images or for none)"
            )
    samples = [s for c in order_categories(list(by_cat), VISA_CATEGORIES) for s in sorted(by_cat[c], key=sample_order)]
    return Dataset("visa", root, samples, "visa", {"layout": "visa-csv"})


@register_dataset("visa", "VisA: original layout (split_csv/1cls.csv) or anomalib's visa_pytorch layout")
def load_visa(root: Path) -> Dataset:
    """VisA at ``root``; the layout is detected (1cls.csv first, then the anomalib folders)."""
    require_dir(root)
    if (root / SPLIT_CSV).is_file():
        return _load_csv(root)
    converted = root / "visa_pytorch"
    base = converted if converted.is_dir() else root
    if is_category_dir(base) or any(is_category_dir(d) for d in subdirs(base)):
        return load_mvtec_like(base, name="visa", kind="visa", layout="visa-anomalib", known=VISA_CATEGORIES)
    raise DataError(
        f"{root}: not a VisA root; looked for {root / SPLIT_CSV} (original layout), "
        f"{converted}/<category>/train|test/ and {root}/<category>/train|test/ (anomalib layout)"
    )
