"""``zsad-bench data check`` and ``zsad-bench data synth`` through the real entry point."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsad_bench.cli.main import main
from zsad_bench.data import open_dataset


def _dataset(root: Path, empty_mask: bool = False, bad_size: bool = False) -> Path:
    base = root / "widget"
    paths = {
        base / "train" / "good" / "a.png": np.full((6, 8), 90, np.uint8),
        base / "test" / "good" / "b.png": np.full((6, 8), 90, np.uint8),
        base / "test" / "dent" / "c.png": np.full((6, 8), 20, np.uint8),
    }
    mask = np.zeros((9, 8) if bad_size else (6, 8), np.uint8)
    if not empty_mask:
        mask[1:3, 1:3] = 255
    paths[base / "ground_truth" / "dent" / "c_mask.png"] = mask
    for path, array in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
    return root


def test_check_ok_and_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path, empty_mask=True)
    assert main(["data", "check", f"folder:{root}", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert ["widget", "test", "1", "1"] in [line.split() for line in out.splitlines()]
    assert "mask of anomalous image c.png is empty" in out
    assert out.rstrip().endswith("OK: 0 errors, 1 warning")


def test_check_error_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path, bad_size=True)
    assert main(["data", "check", f"folder:{root}", "--categories", "widget"]) == 1
    out = capsys.readouterr().out
    assert "mask is 8x9 but its image c.png is 8x6" in out
    assert out.rstrip().endswith("FAILED: 1 error, 0 warnings")


def test_check_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path)
    assert main(["data", "check", f"folder:{root}", "--categories", "gizmo"]) == 2
    err = capsys.readouterr().err
    assert err == f"zsad-bench: error: {root}: unknown category gizmo; available: widget\n"


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in (["data"], ["data", "check"], ["data", "synth"]):
        with pytest.raises(SystemExit) as info:
            main([*cmd, "--help"])
        assert info.value.code == 0
    assert "--seed" in capsys.readouterr().out


def test_synth_is_byte_identical_to_the_cached_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"textures: folder:{tmp_path / 'textures'}",
        f"objects: folder:{tmp_path / 'objects'}",
    ]
    cached = open_dataset("synthetic").root  # generated separately, same default seed
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    assert written == sorted(p.relative_to(cached) for p in cached.rglob("*.png"))
    assert len(written) == 6 * (35 + 15)
    assert all((tmp_path / p).read_bytes() == (cached / p).read_bytes() for p in written)
    # a second run refuses to overwrite
    assert main(["data", "synth", str(tmp_path), "--quiet"]) == 2
    assert "already exists; remove it or choose another output folder" in capsys.readouterr().err


def test_check_accepts_an_image_label_only_category(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path)
    for mask in (root / "widget" / "ground_truth").rglob("*.png"):
        mask.unlink()
    for folder in sorted((root / "widget" / "ground_truth").rglob("*"), reverse=True):
        folder.rmdir()
    (root / "widget" / "ground_truth").rmdir()
    assert main(["data", "check", f"folder:{root}", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "category 'widget' has image labels only (no masks); pixel metrics will not be computed" in out
    assert out.rstrip().endswith("OK: 0 errors, 1 warning")
