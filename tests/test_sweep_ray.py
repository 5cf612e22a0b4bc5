"""``--engine ray`` on a local 2-CPU Ray (started once for the module): the tiny grid of test_sweep_e2e runs
with the same per-point metrics as ``--engine local`` at equal thread counts, extracting each image once and
fitting each SAE once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.test_sweep import sweep_cli
from tests.test_sweep_e2e import GRID, N_IMAGES, metrics_by_category

ray = pytest.importorskip("ray", reason="Ray is in the test extra: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def local_ray() -> object:
    """One local Ray for the module (startup costs seconds); stopped at the end."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_matches_local_engine_and_shares_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_ray: object
) -> None:
    from zsad_bench.sweep.plan import load_grid, points_of

    grid_path = tmp_path / "grid.toml"
    grid_path.write_text(GRID)
    points = points_of(load_grid(grid_path))
    assert len(points) >= 6
    outs = {}
    for engine in ("local", "ray"):
        cache = tmp_path / f"cache-{engine}"
        monkeypatch.setenv("ZSAD_BENCH_CACHE", str(cache))  # workers get the sweep's cache dir from the driver
        out = tmp_path / engine
        assert sweep_cli(["sweep", str(grid_path), "-o", str(out), "--engine", engine, "--threads", "1"]) == 0
        outs[engine] = out
        # each image extracted once (one cache entry each), one SAE per group, trained by one point each
        assert len(list((cache / "features").rglob("*.zfc"))) == N_IMAGES
        assert len(list((cache / "artifacts").rglob("spg-sae-*.pt"))) == 2
        logs = [(out / "_sweep" / "logs" / f"{p.id}.log").read_text() for p in points]
        assert sum("spg: SAE trained" in log for log in logs) == 2
        assert sum("spg: reusing SAE" in log for log in logs) == 2  # the two other fitted points
        manifest = json.loads((out / "_sweep" / "manifest.json").read_text())
        assert sum(s["computed"] for s in manifest["stages"].values()) == N_IMAGES
        assert manifest["engine"] == engine and manifest["threads"] == 1
    ray_pids = {e["pid"] for e in json.loads((outs["ray"] / "_sweep" / "manifest.json").read_text())["points"].values()}
    assert os.getpid() not in ray_pids  # the points ran in Ray workers
    for p in points:
        assert metrics_by_category(outs["ray"] / p.results_name) == metrics_by_category(outs["local"] / p.results_name)
