"""The HTML report opened in a real headless browser (Debian's chromium; `.ci/run` installs it): the
screenshot must show the page's text and its embedded figures (the Okabe-Ito blue of the first curve)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_viz import write_run
from zsad_bench.viz.report import build_report

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
FIRST_CURVE_RGB = (0x00, 0x72, 0xB2)  # Okabe-Ito blue: the first run's colour; nothing else on the page uses it


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install -y chromium; .ci/run does this)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    write_run(tmp_path / "runs", "a", "MethodA", seed=0)
    report, names = build_report([tmp_path / "runs"], tmp_path / "report.html", overlays=2)
    assert names[0] == "image_roc"
    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,4000",
        report.resolve().as_uri(),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), f"chromium wrote no screenshot (rc {res.returncode}): {res.stderr[-500:]}"
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert px.shape[:2] == (4000, 1200)
    assert px.std() > 10 and (px.min(-1) < 200).mean() > 0.02, "the page is blank"
    curve = (np.abs(px - FIRST_CURVE_RGB).max(-1) < 25).sum()
    assert curve > 200, f"the embedded figures did not render ({curve} curve pixels)"
