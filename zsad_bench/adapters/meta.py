"""``meta:PATH``: the ``meta.json`` index used by AnomalyCLIP, AdaCLIP and SPG (read-only).

Format: ``{"train": {cls: [rec, ...]}, "test": {cls: [rec, ...]}}`` where each record has
``img_path`` and ``mask_path`` (relative to the folder holding meta.json; ``""`` for normal images),
``cls_name`` (unused: the class key is the category), ``specie_name`` (defect folder; ``""`` in VisA)
and ``anomaly`` (0/1). ``PATH`` is the dataset root holding ``meta.json`` or the json file itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zsad_bench.adapters._layout import SPLITS, sample_order
from zsad_bench.data import ANOMALOUS, NORMAL, Dataset, Sample, register_dataset
from zsad_bench.errors import DataError

REQUIRED = ("img_path", "mask_path", "anomaly")


def _record(json_path: Path, split: str, cls: str, index: int, rec: Any) -> Sample:
    where = f"{split}/{cls}[{index}]"
    base = json_path.parent
    if not isinstance(rec, dict) or any(k not in rec for k in REQUIRED):
        raise DataError(f"{json_path}: {where} is not a record with {', '.join(REQUIRED)}; fix meta.json")
    if rec["anomaly"] not in (0, 1):
        raise DataError(f"{json_path}: {where} has anomaly={rec['anomaly']!r}; must be 0 or 1")
    label = ANOMALOUS if rec["anomaly"] == 1 else NORMAL
    image = base / str(rec["img_path"])
    if not rec["img_path"] or not image.is_file():
        raise DataError(f"{json_path}: {where} image file {image} does not exist; check the dataset root")
    mask = None
    if label == ANOMALOUS:
        if not rec["mask_path"]:
            raise DataError(f"{json_path}: {where} anomalous image {image} has no mask_path; add its mask")
        mask = base / str(rec["mask_path"])
        if not mask.is_file():
            raise DataError(f"{json_path}: {where} mask file {mask} does not exist; check the dataset root")
    specie = str(rec.get("specie_name") or "")
    defect = "good" if label == NORMAL else (specie if specie and specie != "good" else "bad")
    return Sample(image, cls, label, mask, defect, split)


@register_dataset("meta", "meta.json index of AnomalyCLIP/AdaCLIP/SPG (PATH = dataset root or the json file)")
def load_meta(root: Path | None) -> Dataset:
    """The samples listed in ``root/meta.json`` (or the json file ``root``)."""
    if root is None:
        raise DataError("dataset 'meta' needs a path: use meta:/path/to/root (holding meta.json)")
    json_path = root if root.is_file() else root / "meta.json"
    if not json_path.is_file():
        raise DataError(f"{root}: no meta.json found (looked for {json_path}); pass the dataset root or the json")
    try:
        info = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{json_path}: invalid JSON ({exc.msg} at line {exc.lineno}); fix or regenerate it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{json_path}: cannot read ({exc}); re-copy it") from None
    if not isinstance(info, dict) or not any(s in info for s in SPLITS):
        raise DataError(f"{json_path}: expected an object with 'train' and/or 'test' sections; not a meta.json")
    by_cat: dict[str, list[Sample]] = {}
    for split in SPLITS:
        section = info.get(split, {})
        if not isinstance(section, dict):
            raise DataError(f"{json_path}: section '{split}' must map class names to record lists")
        for cls, recs in section.items():
            if not isinstance(recs, list):
                raise DataError(f"{json_path}: {split}/{cls} must be a list of records")
            bucket = by_cat.setdefault(cls, [])
            bucket += [_record(json_path, split, cls, i, r) for i, r in enumerate(recs)]
    if not by_cat:
        raise DataError(f"{json_path}: lists no classes; regenerate meta.json")
    empty = [c for c, recs in by_cat.items() if not recs]
    if empty:
        raise DataError(f"{json_path}: class '{empty[0]}' lists no images; remove it or regenerate meta.json")
    samples = [s for recs in by_cat.values() for s in sorted(recs, key=sample_order)]
    return Dataset(json_path.parent.name, json_path.parent, samples, "meta", {"layout": "meta.json"})
