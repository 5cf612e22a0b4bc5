"""``meta:PATH``: the ``meta.json`` index used by AnomalyCLIP, AdaCLIP and SPG (read-only).

Format: ``{"train": {cls: [rec, ...]}, "test": {cls: [rec, ...]}}`` where each record has
``img_path`` and ``mask_path`` (relative to the folder holding meta.json; ``""`` for normal images),
``cls_name`` (unused: the class key is the category), ``specie_name`` (defect folder; ``""`` in VisA)
and ``anomaly`` (0/1). ``PATH`` is the dataset root holding ``meta.json`` or the json file itself.
A class whose anomalous records all have an empty ``mask_path`` is image-label-only; a class with
some masks must have all of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zsad_bench.adapters._layout import SPLITS, listed_file, sample_order
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
    image = listed_file(f"{json_path}: {where}", base, str(rec["img_path"] or ""), "image")
    mask = None
    if label == ANOMALOUS and rec["mask_path"]:
        mask = listed_file(f"{json_path}: {where}", base, str(rec["mask_path"]), "mask")
    specie = str(rec.get("specie_name") or "")
    defect = "good" if label == NORMAL else (specie if specie and specie != "good" else "bad")
    return Sample(image, cls, label, mask, defect, split)


@register_dataset("meta", "meta.json index of AnomalyCLIP/AdaCLIP/SPG (PATH = dataset root or the json file)")
def load_meta(root: Path) -> Dataset:
    """The samples listed in ``root/meta.json`` (or the json file ``root``)."""
    json_path = root if root.is_file() else root / "meta.json"
    if not json_path.is_file():
        raise DataError(f"{root}: no meta.json found (looked for {json_path}); pass the dataset root or the json")
    try:
        info = json.loads(json_path.read_text(encoding="utf-8-sig"))
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
    for cls, recs in by_cat.items():
        anomalous = [s for s in recs if s.label == ANOMALOUS]
        without = [s for s in anomalous if s.mask_path is None]
        if without and len(without) < len(anomalous):
            raise DataError(
                f"{json_path}: anomalous image {without[0].image_path} of class '{cls}' has no mask_path, but other "
                "anomalous images of the class have masks; add its mask (masks for all or for none)"
            )
    empty = [c for c, recs in by_cat.items() if not recs]
    if empty:
        raise DataError(f"{json_path}: class '{empty[0]}' lists no images; remove it or regenerate meta.json")
    samples = [s for recs in by_cat.values() for s in sorted(recs, key=sample_order)]
    return Dataset(json_path.parent.name, json_path.parent, samples, "meta", {"layout": "meta.json"})
