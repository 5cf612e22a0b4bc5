"""Bad datasets: one-line DataErrors when opening, and every deep problem collected by check_dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsad_bench.data import DATASETS, Dataset, Sample, open_dataset
from zsad_bench.data.check import ERROR, WARNING, check_dataset
from zsad_bench.errors import DataError


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _grey(value: int, h: int = 6, w: int = 8) -> np.ndarray:
    return np.full((h, w), value, np.uint8)


def _block_mask(h: int = 6, w: int = 8) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[1:4, 1:4] = 255
    return m


def _category(root: Path, cat: str = "widget") -> Path:
    base = root / cat
    _png(base / "train" / "good" / "a.png", _grey(90))
    _png(base / "test" / "good" / "b.png", _grey(90))
    _png(base / "test" / "dent" / "c.png", _grey(20))
    _png(base / "ground_truth" / "dent" / "c_mask.png", _block_mask())
    return base


def _raises(spec: str, *fragments: str) -> str:
    with pytest.raises(DataError) as info:
        open_dataset(spec)
    msg = str(info.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_missing_root(tmp_path: Path) -> None:
    _raises(f"mvtec:{tmp_path / 'nope'}", str(tmp_path / "nope"), "does not exist")


def test_unknown_layouts(tmp_path: Path) -> None:
    (tmp_path / "random").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    _raises(f"mvtec:{tmp_path}", str(tmp_path), "not a mvtec dataset", "<category>/train|test/")
    _raises(f"folder:{tmp_path}", "not a mvtec dataset")
    _raises(f"visa:{tmp_path}", "not a VisA root", "split_csv/1cls.csv", "visa_pytorch")
    _raises(f"meta:{tmp_path}", "no meta.json found", str(tmp_path / "meta.json"))
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("object,split,label,image,mask\n")
    _raises(f"mvtec:{tmp_path}", "not a mvtec dataset", "it looks like VisA: use visa:PATH")


def test_unknown_category(tmp_path: Path) -> None:
    _category(tmp_path)
    with pytest.raises(DataError, match="unknown category gizmo; available: widget"):
        open_dataset(f"folder:{tmp_path}", ["gizmo"])


def test_empty_category(tmp_path: Path) -> None:
    _category(tmp_path)
    (tmp_path / "empty" / "test" / "good").mkdir(parents=True)
    (tmp_path / "empty" / "test" / "good" / "readme.txt").write_text("no images")
    _raises(f"folder:{tmp_path}", str(tmp_path / "empty"), "category 'empty' has no images")


def test_anomalous_image_without_mask(tmp_path: Path) -> None:
    base = _category(tmp_path)
    _png(base / "test" / "dent" / "d.png", _grey(20))
    _raises(f"folder:{tmp_path}", f"{base / 'test' / 'dent' / 'd.png'}: anomalous image has no mask", "d_mask.png")


def _visa(tmp_path: Path, rows: list[str], header: str = "object,split,label,image,mask") -> None:
    _png(tmp_path / "pcb1" / "Data" / "Images" / "Normal" / "0.JPG", _grey(90))
    _png(tmp_path / "pcb1" / "Data" / "Images" / "Anomaly" / "1.JPG", _grey(20))
    _png(tmp_path / "pcb1" / "Data" / "Masks" / "Anomaly" / "1.png", (_block_mask() > 0).astype(np.uint8))
    (tmp_path / "split_csv").mkdir(exist_ok=True)
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join([header, *rows]) + "\n")


GOOD_ROW = "pcb1,train,normal,pcb1/Data/Images/Normal/0.JPG,"
BAD_ROW = "pcb1,test,anomaly,pcb1/Data/Images/Anomaly/1.JPG,pcb1/Data/Masks/Anomaly/1.png"


def test_visa_csv_problems(tmp_path: Path) -> None:
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    _visa(tmp_path, [GOOD_ROW, BAD_ROW])
    assert len(open_dataset(f"visa:{tmp_path}")) == 2
    _visa(tmp_path, [GOOD_ROW, "pcb1,test,normal,pcb1/Data/Images/Normal/9.JPG,"])
    _raises(f"visa:{tmp_path}", f"{csv_path} line 3: image file", "Normal/9.JPG does not exist")
    _visa(tmp_path, [BAD_ROW.replace("Masks/Anomaly/1.png", "Masks/Anomaly/7.png")])
    _raises(f"visa:{tmp_path}", f"{csv_path} line 2: mask file", "7.png does not exist")
    # one anomalous row with a mask and one without: masks for all or for none of a category
    _visa(tmp_path, [BAD_ROW, BAD_ROW.replace("/1.JPG", "/2.JPG").rsplit(",", 1)[0] + ","])
    _png(tmp_path / "pcb1" / "Data" / "Images" / "Anomaly" / "2.JPG", _grey(20))
    _raises(f"visa:{tmp_path}", "line 3: anomalous image has no mask column value", "other anomalous images")
    _visa(tmp_path, [GOOD_ROW.replace("normal", "weird")])
    _raises(f"visa:{tmp_path}", "line 2: label 'weird' is not one of normal, anomaly")
    _visa(tmp_path, [GOOD_ROW], header="a,b,c")
    _raises(f"visa:{tmp_path}", f"{csv_path}: header must be object,split,label,image,mask")


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_visa_csv_saved_by_a_spreadsheet_reads_the_same(tmp_path: Path, newline: str) -> None:
    """Excel's "CSV UTF-8" starts with a byte-order mark; it was refused as a wrong header that looked right."""
    _visa(tmp_path, [GOOD_ROW, BAD_ROW])
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    plain = open_dataset(f"visa:{tmp_path}").samples
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_text().replace("\n", newline).encode())
    assert open_dataset(f"visa:{tmp_path}").samples == plain


def test_meta_json_problems(tmp_path: Path) -> None:
    _category(tmp_path)
    meta = tmp_path / "meta.json"
    meta.write_text("{not json")
    _raises(f"meta:{tmp_path}", f"{meta}: invalid JSON")
    meta.write_text('{"val": {}}')
    _raises(f"meta:{meta}", "expected an object with 'train' and/or 'test' sections")
    rec = {"img_path": "widget/test/dent/c.png", "mask_path": "", "anomaly": 1, "specie_name": "dent"}
    masked = rec | {"img_path": "widget/test/good/b.png", "mask_path": "widget/ground_truth/dent/c_mask.png"}
    meta.write_text(json.dumps({"test": {"widget": [masked, rec]}}))
    _raises(f"meta:{tmp_path}", "anomalous image", "c.png of class 'widget' has no mask_path, but other")
    meta.write_text(json.dumps({"test": {"widget": [rec | {"img_path": "widget/test/dent/zz.png"}]}}))
    _raises(f"meta:{tmp_path}", "test/widget[0] image file", "zz.png does not exist")
    meta.write_text('{"test": {"widget": [{"img_path": "widget/test/dent/c.png"}]}}')
    _raises(f"meta:{tmp_path}", "test/widget[0] is not a record with img_path, mask_path, anomaly")


def test_synthetic_unknown_set() -> None:
    with pytest.raises(DataError, match="unknown synthetic set 'plants'; use synthetic, synthetic:textures"):
        DATASETS.get("synthetic").load(Path("plants"))


def _find(report, level: str, path: Path, fragment: str) -> None:
    hits = [p for p in report.problems if p.level == level and p.path == path and fragment in p.message]
    assert len(hits) == 1, report.render()


def test_check_collects_every_problem(tmp_path: Path) -> None:
    base = _category(tmp_path)
    dent = base / "test" / "dent"
    gt = base / "ground_truth" / "dent"
    # truncated image
    _png(dent / "trunc.png", np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8))
    (dent / "trunc.png").write_bytes((dent / "trunc.png").read_bytes()[:200])
    _png(gt / "trunc_mask.png", _block_mask(40, 40))
    # mask of another size
    _png(dent / "size.png", _grey(20))
    _png(gt / "size_mask.png", _block_mask(12, 8))
    # empty mask
    _png(dent / "empty.png", _grey(20))
    _png(gt / "empty_mask.png", _grey(0))
    # a soft grey image instead of a mask, and a mask with a few JPEG-like grey pixels
    _png(dent / "soft.png", _grey(20))
    _png(gt / "soft_mask.png", np.tile(np.arange(0, 256, 32, dtype=np.uint8), (6, 1)))
    _png(dent / "jpeg.png", _grey(20))
    jpeg_like = _block_mask()
    jpeg_like[5, 7] = 3
    _png(gt / "jpeg_mask.png", jpeg_like)
    # a mask deleted after the dataset was opened
    _png(dent / "gone.png", _grey(20))
    _png(gt / "gone_mask.png", _block_mask())
    ds = open_dataset(f"folder:{tmp_path}")
    (gt / "gone_mask.png").unlink()
    # hand-built: an anomalous image without mask, a duplicate of train/good/a, a normal image with a defect mask
    # in a category without anomalous images
    extra = [
        Sample(dent / "c.png", "widget", 1, None, "other", "test"),
        ds.samples[0],
        Sample(base / "test" / "good" / "b.png", "solo", 0, gt / "c_mask.png", "good", "test"),
    ]
    ds = Dataset(ds.name, ds.root, ds.samples + extra)

    report = check_dataset(ds, progress=False)

    assert not report.ok
    _find(report, ERROR, dent / "trunc.png", "unreadable or truncated image")
    _find(report, ERROR, gt / "size_mask.png", "mask is 8x12 but its image size.png is 8x6")
    _find(report, WARNING, gt / "empty_mask.png", "mask of anomalous image empty.png is empty")
    _find(report, ERROR, gt / "soft_mask.png", "not a binary mask (86% of its foreground is grey)")
    _find(report, WARNING, gt / "jpeg_mask.png", "mask is not binary (2.08% of pixels between 0 and 255")
    _find(report, ERROR, gt / "gone_mask.png", "mask file not found")
    _find(report, ERROR, dent / "c.png", "anomalous image has no mask")
    assert sum("duplicate sample key widget/train/good/a" in p.message for p in report.errors) == 2
    _find(report, WARNING, tmp_path, "category 'solo' has no anomalous test images")
    _find(report, WARNING, gt / "c_mask.png", "normal image b.png has a non-empty mask")
    assert len(report.errors) == 7 and len(report.warnings) == 4
    assert report.counts["widget"] == {"train": {"normal": 2, "anomalous": 0}, "test": {"normal": 1, "anomalous": 8}}
    text = report.render()
    assert "FAILED: 7 errors, 4 warnings" in text
    assert text.count("ERROR  ") == 7


@pytest.mark.realmini
def test_check_realmini_empty_mtd_masks(realmini: Path) -> None:
    ds = open_dataset(f"folder:{realmini / 'mtd'}")
    uneven = Dataset(ds.name, ds.root, [s for s in ds if s.defect_type == "uneven"])
    report = check_dataset(uneven, progress=False)
    assert report.ok
    empty = sorted(p.path.name for p in report.warnings if "is empty" in p.message)
    assert empty == [
        "exp3_num_45042_mask.png",
        "exp4_num_124690_mask.png",
        "exp4_num_352527_mask.png",
        "exp4_num_45057_mask.png",
    ]
