"""Dataset adapters on the real realmini layouts and on tiny layouts built in tmp_path."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsad_bench.data import Dataset, open_dataset
from zsad_bench.data.io import load_mask


def _png(path: Path, value: int = 0, size: tuple[int, int] = (8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)


def _mvtec_tree(root: Path, cat: str = "widget") -> Path:
    """``cat`` with train/good 2, test/good 1, test/dent 2, test/scratch 1 and their masks (a 2x3 block each)."""
    base = root / cat
    for name in ("b.png", "a.png"):
        _png(base / "train" / "good" / name, 100)
    _png(base / "test" / "good" / "c.png", 100)
    for defect, stems in {"dent": ("y", "x"), "scratch": ("z",)}.items():
        for stem in stems:
            _png(base / "test" / defect / f"{stem}.png", 50)
            mask = np.zeros((6, 8), np.uint8)
            mask[1:3, 2:5] = 255
            out = base / "ground_truth" / defect / f"{stem}_mask.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(out)
    return root


def _table(ds: Dataset) -> Counter:
    return Counter((s.category, s.split, s.defect_type, s.label) for s in ds)


@pytest.mark.realmini
def test_realmini_mvtec_counts_and_order(realmini: Path) -> None:
    ds = open_dataset(f"mvtec:{realmini / 'mvtec_ad'}")
    assert ds.categories == ["bottle"]
    assert _table(ds) == {
        ("bottle", "train", "good", 0): 10,
        ("bottle", "test", "good", 0): 20,
        ("bottle", "test", "broken_large", 1): 20,
        ("bottle", "test", "broken_small", 1): 22,
        ("bottle", "test", "contamination", 1): 21,
    }
    assert all((s.mask_path is None) == (s.label == 0) for s in ds)
    assert all(s.mask_path.name == f"{s.image_path.stem}_mask.png" for s in ds if s.mask_path)
    test_paths = [str(s.image_path) for s in ds if s.split == "test" and s.defect_type == "broken_small"]
    assert test_paths == sorted(test_paths)
    assert [s.split for s in ds][:11] == ["train"] * 10 + ["test"]
    # the single-category folder gives the same samples
    assert open_dataset(f"mvtec:{realmini / 'mvtec_ad' / 'bottle'}").samples == ds.samples


@pytest.mark.realmini
def test_realmini_mvtec_mask_pixels(realmini: Path) -> None:
    ds = open_dataset(f"mvtec:{realmini / 'mvtec_ad'}")
    by_key = {s.key: s for s in ds}
    # counts of non-zero pixels, computed once with PIL + numpy.count_nonzero on the PNG files
    assert load_mask(by_key["bottle/test/broken_large/000"]).sum() == 88192
    assert load_mask(by_key["bottle/test/contamination/020"]).sum() == 121385
    normal = load_mask(by_key["bottle/test/good/000"])
    assert normal.shape == (900, 900) and not normal.any()


@pytest.mark.realmini
def test_realmini_visa_csv_counts_and_binary_masks(realmini: Path) -> None:
    ds = open_dataset(f"visa:{realmini / 'visa'}")
    assert ds.categories == ["capsules", "macaroni1"]
    assert ds.meta["layout"] == "visa-csv"
    expected = {}
    for cat in ("capsules", "macaroni1"):
        expected |= {(cat, "train", "good", 0): 20, (cat, "test", "good", 0): 25, (cat, "test", "bad", 1): 50}
    assert _table(ds) == expected
    by_key = {s.key: s for s in ds}
    # VisA masks hold small labels (0/1, 0/4, ...): every non-zero value is defect
    capsule = load_mask(by_key["capsules/test/bad/000"])
    assert capsule.shape == (1000, 1500) and capsule.sum() == 837
    assert load_mask(by_key["macaroni1/test/bad/049"]).sum() == 472


@pytest.mark.realmini
def test_realmini_mtd_via_folder(realmini: Path) -> None:
    ds = open_dataset(f"folder:{realmini / 'mtd'}")
    assert ds.categories == ["magnetic_tile"]
    counts = Counter((s.split, s.defect_type) for s in ds)
    assert counts == {
        ("train", "good"): 10,
        ("test", "good"): 30,
        ("test", "blowhole"): 115,
        ("test", "break"): 85,
        ("test", "crack"): 57,
        ("test", "fray"): 32,
        ("test", "uneven"): 103,
    }
    blowhole = next(s for s in ds if s.defect_type == "blowhole")
    assert blowhole.image_path.name == "exp1_num_108719.jpg"
    assert load_mask(blowhole).shape == (373, 248) and load_mask(blowhole).sum() == 109


def test_mvtec_layout_order_and_masks(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path)
    ds = open_dataset(f"folder:{root}")
    assert [s.key for s in ds] == [
        "widget/train/good/a",
        "widget/train/good/b",
        "widget/test/good/c",
        "widget/test/dent/x",
        "widget/test/dent/y",
        "widget/test/scratch/z",
    ]
    assert [s.label for s in ds] == [0, 0, 0, 1, 1, 1]
    assert load_mask(ds.samples[3]).sum() == 6
    assert ds.kind == "folder" and ds.name == root.name


def test_mask_named_like_the_image(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path)
    gt = root / "widget" / "ground_truth" / "scratch"
    (gt / "z_mask.png").rename(gt / "z.png")
    ds = open_dataset(f"folder:{root}")
    assert ds.samples[-1].mask_path == gt / "z.png"


def test_category_order_known_then_alphabetical(tmp_path: Path) -> None:
    for cat in ("zipper", "aaa_custom", "bottle", "carpet"):
        _mvtec_tree(tmp_path, cat)
    assert open_dataset(f"mvtec:{tmp_path}").categories == ["bottle", "carpet", "zipper", "aaa_custom"]
    assert open_dataset(f"folder:{tmp_path}").categories == ["aaa_custom", "bottle", "carpet", "zipper"]
    assert open_dataset(f"mvtec:{tmp_path}", ["zipper", "bottle"]).categories == ["zipper", "bottle"]


def test_visa_anomalib_layout(tmp_path: Path) -> None:
    base = tmp_path / "visa_pytorch"
    for cat in ("pcb1", "candle"):
        _png(base / cat / "train" / "good" / "0001.JPG", 90)
        _png(base / cat / "test" / "good" / "0002.JPG", 90)
        _png(base / cat / "test" / "bad" / "0003.JPG", 40)
        mask = np.zeros((6, 8), np.uint8)
        mask[0, :5] = 255
        (base / cat / "ground_truth" / "bad").mkdir(parents=True)
        Image.fromarray(mask).save(base / cat / "ground_truth" / "bad" / "0003.png")
    for spec_root in (tmp_path, base):
        ds = open_dataset(f"visa:{spec_root}")
        assert ds.meta["layout"] == "visa-anomalib"
        assert ds.categories == ["candle", "pcb1"]
        assert [s.key for s in ds][:3] == ["candle/train/good/0001", "candle/test/good/0002", "candle/test/bad/0003"]
        assert load_mask(ds.samples[2]).sum() == 5


def test_visa_csv_layout_tiny(tmp_path: Path) -> None:
    for name in ("Normal/1.JPG", "Normal/0.JPG", "Anomaly/5.JPG"):
        _png(tmp_path / "fryum" / "Data" / "Images" / name, 70)
    mask = np.zeros((6, 8), np.uint8)
    mask[2:4, 2:4] = 1
    (tmp_path / "fryum" / "Data" / "Masks" / "Anomaly").mkdir(parents=True)
    Image.fromarray(mask).save(tmp_path / "fryum" / "Data" / "Masks" / "Anomaly" / "5.png")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "fryum,test,anomaly,fryum/Data/Images/Anomaly/5.JPG,fryum/Data/Masks/Anomaly/5.png\n"
        "fryum,train,normal,fryum/Data/Images/Normal/1.JPG,\n"
        "fryum,test,normal,fryum/Data/Images/Normal/0.JPG,\n"
    )
    ds = open_dataset(f"visa:{tmp_path}")
    assert [s.key for s in ds] == ["fryum/train/good/1", "fryum/test/good/0", "fryum/test/bad/5"]
    assert load_mask(ds.samples[2]).sum() == 4  # {0,1} mask: the four 1-pixels are foreground


def test_meta_json_matches_folder_adapter(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path / "copy")
    reference = open_dataset(f"folder:{root}")
    sections: dict[str, dict[str, list[dict]]] = {"train": {}, "test": {}}
    for s in reversed(reference.samples):  # meta.json order must not matter
        sections[s.split].setdefault(s.category, []).append(
            {
                "img_path": str(s.image_path.relative_to(root)),
                "mask_path": str(s.mask_path.relative_to(root)) if s.mask_path else "",
                "cls_name": s.category,
                "specie_name": s.defect_type,
                "anomaly": s.label,
            }
        )
    (root / "meta.json").write_text(json.dumps(sections))
    for spec in (f"meta:{root}", f"meta:{root / 'meta.json'}"):
        ds = open_dataset(spec)
        assert ds.samples == reference.samples
        assert ds.kind == "meta"
    # a meta.json saved with a byte-order mark (Windows editors) reads the same
    (root / "meta.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(sections).encode())
    assert open_dataset(f"meta:{root}").samples == reference.samples
