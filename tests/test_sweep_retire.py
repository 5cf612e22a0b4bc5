"""Points an edited grid no longer has: their files leave the sweep folder for ``_sweep/retired/`` (so
``table DIR`` does not render results of another configuration), and come back when the grid has them again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_sweep import GRID, sweep_cli, write
from zsad_bench.results import RunResult, results_files
from zsad_bench.sweep.engines import LocalEngine
from zsad_bench.sweep.plan import load_grid, make_plan, points_of


def test_points_removed_from_the_grid_are_retired_and_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import zsad_bench.sweep as sweep_pkg

    out = tmp_path / "out"
    ran: list[str] = []

    def fake(payload: dict) -> dict:  # a finished point: a complete (empty) results file + its csv and maps
        if payload["kind"] == "point":
            ran.append(payload["id"])
            path = Path(payload["out"])
            RunResult("r", "spg", "SPG", "effnet-lite0", "p", [], [], {}, [111], "zero-shot", {}, complete=True).save(
                path
            )
            (path.with_suffix(".maps") / "seed=111").mkdir(parents=True)
        return {"id": payload["id"], "status": "done", "computed": 0, "cached": 0}

    monkeypatch.setattr(sweep_pkg, "build_engine", lambda args, threads, gpus: (LocalEngine(["cpu"], fake), 1, 0.0))
    grid = write(tmp_path, GRID)
    everything = {p.id for p in make_plan(points_of(load_grid(grid))).points}
    assert sweep_cli(["sweep", str(grid), "-o", str(out)]) == 0
    assert set(ran) == everything and len(everything) == 6

    # the edited grid drops the sae_k = 8 points (3 of 6)
    write(tmp_path, GRID.replace("set.sae_k = [4, 8]", "set.sae_k = [4]"))
    kept = {p.id for p in make_plan(points_of(load_grid(grid))).points}
    gone = everything - kept
    assert len(gone) == 3 and kept < everything
    capsys.readouterr()
    assert sweep_cli(["sweep", str(grid), "-o", str(out), "--dry-run"]) == 0
    listed = [ln.split() for ln in capsys.readouterr().out.splitlines() if " retire " in ln]
    assert {ln[1] for ln in listed} == gone
    ran.clear()
    assert sweep_cli(["sweep", str(grid), "-o", str(out)]) == 0
    assert ran == []  # the kept points were complete
    assert "3 point(s) of an earlier grid are not in this one" in capsys.readouterr().err
    assert {p.stem for p in results_files([out])} == kept  # what `table out` renders
    shelf = out / "_sweep" / "retired"
    for pid in gone:
        assert {p.name for p in shelf.glob(f"{pid}.*")} == {f"{pid}.json", f"{pid}.csv", f"{pid}.maps"}
    manifest = json.loads((out / "_sweep" / "manifest.json").read_text())
    assert set(manifest["points"]) == kept and set(manifest["retired"]) == gone

    # the grid as it was: the retired points come back, complete, and nothing is recomputed
    write(tmp_path, GRID)
    assert sweep_cli(["sweep", str(grid), "-o", str(out)]) == 0
    assert ran == [] and "3 point(s) back in the grid" in capsys.readouterr().err
    assert {p.stem for p in results_files([out])} == everything and not any(shelf.iterdir())
    manifest = json.loads((out / "_sweep" / "manifest.json").read_text())
    assert set(manifest["points"]) == everything and manifest["retired"] == {}
