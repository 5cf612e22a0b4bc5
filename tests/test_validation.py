"""Issue #11, data side: one validator for run and data check, fit fingerprints, decoding, bad files, bad options."""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from zsad_bench.cli.main import main
from zsad_bench.data import (
    DATASETS,
    DECODING,
    Dataset,
    check_aux_supervision,
    open_dataset,
    pixel_labelled,
    samples_fingerprint,
    validate,
)
from zsad_bench.data.check import check_dataset
from zsad_bench.data.io import load_image, load_mask, mask_values, resize_mask
from zsad_bench.errors import DataError, ZsadError
from zsad_bench.metrics import IMAGE_METRICS, PIXEL_METRICS, MetricAccumulator, category_mean
from zsad_bench.paths import cache_dir


def _png(path: Path, array: np.ndarray, **save: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save)
    return path


def _block(h: int = 6, w: int = 8) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[1:4, 1:4] = 255
    return m


def _category(root: Path, cat: str = "widget", masks: bool = True, n_bad: int = 2) -> Path:
    """``cat`` with train/good 1, test/good 2, test/dent ``n_bad`` (masks in ground_truth/ when ``masks``)."""
    base = root / cat
    _png(base / "train" / "good" / "a.png", np.full((6, 8), 90, np.uint8))
    for name in ("b", "c"):
        _png(base / "test" / "good" / f"{name}.png", np.full((6, 8), 90, np.uint8))
    for i in range(n_bad):
        _png(base / "test" / "dent" / f"d{i}.png", np.full((6, 8), 20, np.uint8))
        if masks:
            _png(base / "ground_truth" / "dent" / f"d{i}_mask.png", _block())
    return base


def _one_line_error(fn, *fragments: str) -> str:
    with pytest.raises(ZsadError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# ----------------------------------------------------------------------------- item 1: fit fingerprint


def test_fingerprint_changes_with_mask_files_and_labels(tmp_path: Path) -> None:
    base = _category(tmp_path)
    ds = open_dataset(f"folder:{tmp_path}")
    before = samples_fingerprint(ds.samples)
    assert samples_fingerprint(open_dataset(f"folder:{tmp_path}").samples) == before  # stable
    # invert one auxiliary mask: same name, same size on disk is not guaranteed, so pin the mtime too
    mask = base / "ground_truth" / "dent" / "d0_mask.png"
    stat = mask.stat()
    _png(mask, 255 - _block())
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert samples_fingerprint(ds.samples) != before
    # a relabelled defect type (same files) is another fit as well
    moved = [replace(s, defect_type="other") for s in ds.samples]
    assert samples_fingerprint(moved) != samples_fingerprint(ds.samples)
    # and so is another decoding policy
    assert samples_fingerprint(ds.samples, {**DECODING, "exif_orientation": "ignored"}) != samples_fingerprint(
        ds.samples
    )


# ----------------------------------------------------------------------------- items 3 + 7: one validator


def test_wrong_size_mask_is_an_error_in_run_validation_and_in_data_check(tmp_path: Path, capsys) -> None:
    base = _category(tmp_path)
    bad = _png(base / "ground_truth" / "dent" / "d1_mask.png", _block(9, 8))
    ds = open_dataset(f"folder:{tmp_path}")
    _one_line_error(lambda: validate(ds, role="target"), f"{bad}: mask is 8x9 but its image d1.png is 8x6")
    assert main(["data", "check", f"folder:{tmp_path}", "--quiet"]) == 1
    assert f"{bad}: mask is 8x9 but its image d1.png is 8x6" in capsys.readouterr().out


def test_duplicated_visa_csv_row_is_an_error(tmp_path: Path) -> None:
    _png(tmp_path / "pcb1" / "Data" / "Images" / "Normal" / "0.JPG", np.full((6, 8), 90, np.uint8))
    _png(tmp_path / "pcb1" / "Data" / "Images" / "Anomaly" / "1.JPG", np.full((6, 8), 20, np.uint8))
    _png(tmp_path / "pcb1" / "Data" / "Masks" / "Anomaly" / "1.png", (_block() > 0).astype(np.uint8))
    (tmp_path / "split_csv").mkdir()
    bad_row = "pcb1,test,anomaly,pcb1/Data/Images/Anomaly/1.JPG,pcb1/Data/Masks/Anomaly/1.png"
    rows = ["object,split,label,image,mask", "pcb1,test,normal,pcb1/Data/Images/Normal/0.JPG,", bad_row]
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    validate(open_dataset(f"visa:{tmp_path}"), role="target")  # the clean file passes
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join([*rows, bad_row]) + "\n")
    ds = open_dataset(f"visa:{tmp_path}")
    _one_line_error(
        lambda: validate(ds, role="target"),
        "duplicate sample key pcb1/test/bad/1",
        "(1 more error: zsad-bench data check lists them all)",
    )


def test_validation_is_remembered_for_an_unchanged_dataset_only(tmp_path: Path) -> None:
    base = _category(tmp_path)
    ds = open_dataset(f"folder:{tmp_path}")
    assert validate(ds, role="target").ok
    assert list((cache_dir() / "validated").glob("*.json"))
    mask = base / "ground_truth" / "dent" / "d1_mask.png"
    stat = mask.stat()
    _png(mask, _block(9, 8))  # edited after a passed validation: the memo must not hide it
    os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    _one_line_error(lambda: validate(ds, role="target"), "mask is 8x9")


def test_auxiliary_role_does_not_warn_about_test_images(tmp_path: Path) -> None:
    _category(tmp_path)
    train = open_dataset(f"folder:{tmp_path}").select(split="train")
    assert any("no anomalous test images" in p.message for p in check_dataset(train, False).warnings)
    assert not validate(train, role="auxiliary").warnings


# ----------------------------------------------------------------------------- EXIF orientation


def _exif_rotated(path: Path, stored: np.ndarray, orientation: int = 6) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(stored).save(path, exif=exif)
    return path


def test_exif_orientation_applies_to_images_and_masks_alike(tmp_path: Path) -> None:
    base = _category(tmp_path, n_bad=1)
    stored = np.arange(48, dtype=np.uint8).reshape(6, 8)
    image = _exif_rotated(base / "test" / "dent" / "d0.png", stored)
    # orientation 6: a viewer rotates the stored pixels 90 degrees clockwise
    shown = np.rot90(stored, k=-1)
    assert np.array_equal(np.asarray(load_image(image))[..., 0], shown)
    mask_on_display = np.zeros((8, 6), np.uint8)
    mask_on_display[0:2, 0:3] = 255
    _png(base / "ground_truth" / "dent" / "d0_mask.png", mask_on_display)
    ds = open_dataset(f"folder:{tmp_path}")
    report = validate(ds, role="target")
    assert any("EXIF orientation 6" in p.message and p.path == image for p in report.warnings)
    # a mask with the same EXIF tag is turned the same way
    _exif_rotated(base / "ground_truth" / "dent" / "d0_mask.png", np.rot90(mask_on_display, k=1))
    assert np.array_equal(mask_values(base / "ground_truth" / "dent" / "d0_mask.png") > 0, mask_on_display > 0)
    # a mask drawn on the stored (unrotated) pixels no longer fits
    _png(base / "ground_truth" / "dent" / "d0_mask.png", _block())
    _one_line_error(lambda: validate(open_dataset(f"folder:{tmp_path}"), role="target"), "mask is 8x6")


# ----------------------------------------------------------------------------- item 4: 16-bit and float


def test_16_bit_and_float_images_are_scaled_by_their_range(tmp_path: Path) -> None:
    ramp = np.linspace(0, 4000, 64).reshape(8, 8).astype(np.uint16)
    path = _png(tmp_path / "ramp16.png", ramp)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I;16")
    got = np.asarray(load_image(path))
    expected = np.rint(ramp.astype(np.float64) / 4000 * 255).astype(np.uint8)  # 0..4000 -> 0..255
    assert np.array_equal(got[..., 0], expected) and np.array_equal(got[..., 2], expected)
    assert (got == 255).mean() < 0.05  # not the clipped, mostly white picture
    floats = np.linspace(-2.0, 6.0, 64, dtype=np.float32).reshape(8, 8)
    tif = tmp_path / "float.tiff"
    Image.fromarray(floats).save(tif)
    assert np.array_equal(np.asarray(load_image(tif))[..., 1], np.rint((floats + 2) / 8 * 255).astype(np.uint8))
    # a 16-bit mask is thresholded on its raw values: 1 is foreground
    mask = np.zeros((8, 8), np.uint16)
    mask[2, 3] = 1
    mask[5, 5] = 40000
    assert np.array_equal(mask_values(_png(tmp_path / "m16.png", mask)) > 0, mask > 0)


def test_check_reports_high_bit_depth_images(tmp_path: Path) -> None:
    base = _category(tmp_path)
    _png(base / "test" / "good" / "b.png", np.full((6, 8), 3000, np.uint16))
    report = check_dataset(open_dataset(f"folder:{tmp_path}"), progress=False)
    assert report.ok
    assert any("1 image is 16-bit or float" in p.message for p in report.warnings)


# ----------------------------------------------------------------------------- image-label-only data


def test_image_label_only_dataset_gives_image_metrics_and_no_pixel_metrics(tmp_path: Path) -> None:
    _category(tmp_path, "plain", masks=False, n_bad=3)
    _category(tmp_path, "masked", masks=True, n_bad=2)
    ds = open_dataset(f"folder:{tmp_path}")
    plain = ds.select(["plain"])
    assert [s.mask_path for s in plain if s.label == 1] == [None, None, None]
    assert pixel_labelled(plain.samples) is False and pixel_labelled(ds.select(["masked"]).samples) is True
    report = validate(ds, role="target")
    assert any("category 'plain' has image labels only" in p.message for p in report.warnings)

    test = plain.select(split="test").samples
    scores = np.array([0.1, 0.5, 0.4, 0.9, 0.3])  # b, c normal; d0, d1, d2 anomalous
    labels = np.array([s.label for s in test])
    assert labels.tolist() == [0, 0, 1, 1, 1]
    acc = MetricAccumulator(pixel_labels=pixel_labelled(test))
    acc.update(np.random.default_rng(0).random((5, 6, 8)), None, scores, labels)
    got = acc.compute()
    assert set(got) == set(IMAGE_METRICS)  # pixel metrics absent, not NaN
    assert got["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert got["image_ap"] == pytest.approx(average_precision_score(labels, scores))
    with pytest.raises(ZsadError, match="told its category has none"):
        acc.update(None, np.zeros((1, 6, 8), bool), scores[:1], labels[:1])
    # means: the label-only category adds to the image columns only
    mean = category_mean({"plain": got, "masked": {"image_auroc": 0.5, **dict.fromkeys(PIXEL_METRICS, 0.8)}})
    assert mean["image_auroc"] == pytest.approx((got["image_auroc"] + 0.5) / 2)
    assert mean["pixel_auroc"] == pytest.approx(0.8)


def test_masks_for_some_anomalous_images_only_stay_an_error(tmp_path: Path) -> None:
    base = _category(tmp_path, n_bad=2)
    (base / "ground_truth" / "dent" / "d1_mask.png").unlink()
    _one_line_error(lambda: open_dataset(f"folder:{tmp_path}"), "d1.png: anomalous image has no mask")
    _category(tmp_path / "ok")
    samples = open_dataset(f"folder:{tmp_path / 'ok'}").samples
    mixed = [replace(s, mask_path=None) if s.image_path.stem == "d1" else s for s in samples]
    _one_line_error(lambda: pixel_labelled(mixed), "d1.png: anomalous image has no mask, but 1 other anomalous images")
    report = check_dataset(Dataset("x", tmp_path, mixed), progress=False)
    assert [p.path.name for p in report.errors] == ["d1.png"]


# ----------------------------------------------------------------------------- item 10: auxiliary supervision


def test_aux_supervision(tmp_path: Path) -> None:
    _category(tmp_path, "masked")
    _category(tmp_path, "plain", masks=False)
    ds = open_dataset(f"folder:{tmp_path}")
    _one_line_error(
        lambda: check_aux_supervision(ds.select(split="train"), needs_masks=True),
        "has no anomalous images",
        "zero positives",
        "use --aux-split test",
    )
    _one_line_error(
        lambda: check_aux_supervision(ds.select(split="test"), needs_masks=True),
        "auxiliary category plain",
        "image labels only",
    )
    check_aux_supervision(ds.select(split="test"), needs_masks=False)
    check_aux_supervision(ds.select(["masked"], "test"), needs_masks=True)


# ----------------------------------------------------------------------------- tracebacks -> one line


def test_target_pointing_to_a_file(tmp_path: Path) -> None:
    file = _png(tmp_path / "x.png", np.zeros((4, 4), np.uint8))
    for scheme in ("mvtec", "folder", "visa"):
        _one_line_error(lambda s=scheme: open_dataset(f"{s}:{file}"), f"{file}: the dataset root is a file")


def test_unreadable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _category(tmp_path)
    locked = base / "test" / "dent"
    real = Path.iterdir

    def iterdir(self: Path):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)  # chmod 000 does not stop root, who runs CI
    _one_line_error(lambda: open_dataset(f"folder:{tmp_path}"), f"{locked}: cannot list the folder (Permission denied)")


def test_symlink_loop_and_fifo_are_refused_not_read(tmp_path: Path) -> None:
    base = _category(tmp_path)
    loop = base / "test" / "good" / "loop.png"
    loop.symlink_to(loop)
    _one_line_error(lambda: open_dataset(f"folder:{tmp_path}"), f"{loop}: cannot read it", "symbolic links")
    loop.unlink()
    fifo = base / "ground_truth" / "dent" / "d0_mask.png"
    fifo.unlink()
    os.mkfifo(fifo)  # opening it for reading would block forever
    _one_line_error(lambda: open_dataset(f"folder:{tmp_path}"), f"{fifo}: not a regular file")
    # a FIFO that appears after the dataset was opened is refused by the reader itself
    fifo.unlink()
    _png(fifo, _block())
    ds = open_dataset(f"folder:{tmp_path}")
    fifo.unlink()
    os.mkfifo(fifo)
    sample = next(s for s in ds if s.mask_path == fifo)
    _one_line_error(lambda: load_mask(sample), "not a regular file")
    report = check_dataset(ds, progress=False)
    assert any(p.path == fifo and "not a regular file" in p.message for p in report.errors)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` (1-bit grey): decoding it would need a huge buffer."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_one_line_with_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    _one_line_error(
        lambda: load_image(bomb), "20000x20000 = 400,000,000 pixels", "limit of 178,956,970", "ZSAD_BENCH_MAX_PIXELS="
    )
    small = _png(tmp_path / "small.png", np.zeros((6, 8), np.uint8))
    monkeypatch.setenv("ZSAD_BENCH_MAX_PIXELS", "40")
    _one_line_error(lambda: load_image(small), "8x6 = 48 pixels, above the limit of 40")
    monkeypatch.setenv("ZSAD_BENCH_MAX_PIXELS", "48")
    assert load_image(small).size == (8, 6)
    monkeypatch.setenv("ZSAD_BENCH_MAX_PIXELS", "lots")
    _one_line_error(lambda: load_image(small), "ZSAD_BENCH_MAX_PIXELS=lots: must be a positive number")


def test_cache_variable_pointing_at_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    file = tmp_path / "cache.txt"
    file.write_text("not a folder")
    monkeypatch.setenv("ZSAD_BENCH_CACHE", str(file))
    _one_line_error(cache_dir, f"{file}: ZSAD_BENCH_CACHE is not a folder")
    monkeypatch.setenv("ZSAD_BENCH_CACHE", str(file / "sub"))
    _one_line_error(cache_dir, f"({file} is a file)")
    assert main(["cache", "info"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    monkeypatch.setenv("ZSAD_BENCH_CACHE", str(tmp_path / "fine"))
    assert main(["cache", "info", "--dir", str(file)]) == 2
    assert capsys.readouterr().err == f"zsad-bench: error: {file}: --dir is not a folder; point it at a folder\n"


def test_synthetic_unknown_set_still_one_line() -> None:
    _one_line_error(lambda: DATASETS.get("synthetic").load(Path("plants")), "unknown synthetic set 'plants'")


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    path = _png(tmp_path / "x.png", np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:120])
    with pytest.raises(DataError, match=f"{path}: unreadable or truncated image"):
        load_image(path)


# ----------------------------------------------------------------------------- item 5: run options


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--batch-size", "-4", "argument --batch-size: -4: must be a positive integer"),
        ("--batch-size", "0", "argument --batch-size: 0: must be a positive integer"),
        ("--image-size", "0", "argument --image-size: 0: must be a positive integer"),
        ("--shots", "0", "argument --shots: 0: must be a positive integer"),
        ("--seed", "-1", "argument --seed: -1: must be 0 or a positive integer"),
        ("--num-workers", "-2", "argument --num-workers: -2: must be 0 or a positive integer"),
        ("--device", "gpu", "argument --device: gpu: unknown device"),
        ("--device", "cuda:x", "argument --device: cuda:x: unknown device"),
    ],
)
def test_bad_run_options_are_refused_up_front(option: str, value: str, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--method", "toy-zeroshot", option, value])
    assert info.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_good_devices_pass() -> None:
    from zsad_bench.cli.common import device_name

    assert [device_name(d) for d in ("auto", "cpu", "cuda", "cuda:1", "mps")] == [
        "auto",
        "cpu",
        "cuda",
        "cuda:1",
        "mps",
    ]


def test_one_mask_resize() -> None:
    # PIL bilinear 2x2 -> 4x4, pixel centres: per axis the 255 pixel gives 255, 191, 64, 0; > 127.5 keeps 2x2
    expected = np.zeros((4, 4), bool)
    expected[:2, :2] = True
    assert np.array_equal(resize_mask(np.array([[1, 0], [0, 0]], bool), 4), expected)
    # the accumulator resizes with the same function: a map equal to that block scores the mask perfectly
    acc = MetricAccumulator(("pixel_auroc",), resolution=4)
    acc.update(expected[None].astype(np.float32), np.array([[[1, 0], [0, 0]]], bool), None, None)
    assert acc.compute() == {"pixel_auroc": 1.0}
