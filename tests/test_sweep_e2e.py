"""Sweeps end to end on tiny SPG points (effnet-lite0 at 64 px, 1 aux category, 2 target categories):
shared stages run once, a SIGKILLed sweep resumes the killed point from its last category without
redoing any forward or fit, a point equals its standalone run, and ``table`` renders the sweep dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_sweep import sweep_cli

ROOT = Path(__file__).resolve().parents[1]

GRID = """\
[sweep]
threads = 1

[base]
backbone = "effnet-lite0"
image_size = 64
aux = ["synthetic:objects"]
aux_categories = "cap"
target = ["synthetic:textures"]
categories = "weave,marble"
device = "cpu"
set = { sae_width = 64, sae_epochs = 1, guide_epochs = 1, guide_batch_size = 4 }

[grid]
method = ["spg", "spg-topk"]
set.sae_k = [4, 8]
set.sigma = [1.0, 2.0]

[[exclude]]
method = "spg-topk"
set.sigma = 2.0
"""
N_IMAGES = 25 + 50  # aux: cap test images; targets: weave + marble test images
KILL_AT = 8  # the 8th category evaluation: 3 points (2 categories each) done, the 4th has one category

# Counts backbone forwards (images computed by the feature store), SAE fits and detector fits in a
# file, and SIGKILLs this process at the KILL_AT-th category evaluation.
COUNTED_SWEEP = """
import argparse, os, signal, sys
from zsad_bench.features import FeatureStore
from zsad_bench.methods.spg import SPG
from zsad_bench.metrics import MetricAccumulator

counter, kill_at = sys.argv[1], int(sys.argv[2])
def note(kind, n):
    with open(counter, "a") as fh:
        fh.write(f"{kind} {n}\\n")
def wrap(cls, name, kind, size):
    orig = getattr(cls, name)
    def counted(self, *a, **k):
        note(kind, size(a))
        return orig(self, *a, **k)
    setattr(cls, name, counted)
wrap(FeatureStore, "_compute", "forward", lambda a: len(a[0]))
wrap(SPG, "_train_sae", "sae", lambda a: 1)
wrap(SPG, "fit", "fit", lambda a: 1)
evals = [0]
compute = MetricAccumulator.compute
def killing(self):
    evals[0] += 1
    if evals[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return compute(self)
MetricAccumulator.compute = killing
from zsad_bench.cli import sweep
parser = argparse.ArgumentParser()
sweep.add_parser(parser.add_subparsers(dest="command"))
args = parser.parse_args(sys.argv[3:])
sys.exit(args.func(args))
"""


def counts(path: Path) -> dict[str, int]:
    out = {"forward": 0, "sae": 0, "fit": 0}
    if path.is_file():
        for line in path.read_text().split("\n"):
            if line:
                kind, n = line.split()
                out[kind] += int(n)
    return out


def count_in_process(monkeypatch: pytest.MonkeyPatch, counter: Path) -> None:
    """The same counters as COUNTED_SWEEP, in this process."""
    from zsad_bench.features import FeatureStore
    from zsad_bench.methods.spg import SPG

    def wrap(cls: type, name: str, kind: str, size) -> None:
        orig = getattr(cls, name)

        def counted(self, *a, **k):
            with open(counter, "a") as fh:
                fh.write(f"{kind} {size(a)}\n")
            return orig(self, *a, **k)

        monkeypatch.setattr(cls, name, counted)

    wrap(FeatureStore, "_compute", "forward", lambda a: len(a[0]))
    wrap(SPG, "_train_sae", "sae", lambda a: 1)
    wrap(SPG, "fit", "fit", lambda a: 1)


def metrics_by_category(path: Path) -> dict[str, dict[str, float]]:
    return {r["category"]: r["metrics"] for r in json.loads(path.read_text())["records"]}


@pytest.mark.slow
def test_sweep_shares_stages_survives_sigkill_and_matches_standalone_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from zsad_bench.cli.main import main
    from zsad_bench.runner import run_experiment
    from zsad_bench.sweep.plan import load_grid, make_plan, points_of, spec_from_options

    grid_path = tmp_path / "grid.toml"
    grid_path.write_text(GRID)
    out = tmp_path / "sweep"
    cache = tmp_path / "cache"
    counter = tmp_path / "counts.txt"
    env = {**os.environ, "ZSAD_BENCH_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", COUNTED_SWEEP, str(counter), str(KILL_AT), "sweep", str(grid_path), "-o", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # before the kill: every image went through the backbone once (the fill stages), both SAE groups fit once;
    # the sigma=2 points reuse the sigma=1 checkpoints (sigma only affects scoring), so 2 detector fits
    first = counts(counter)
    assert first == {"forward": N_IMAGES, "sae": 2, "fit": 2}, first

    monkeypatch.setenv("ZSAD_BENCH_CACHE", str(cache))
    plan = make_plan(points_of(load_grid(grid_path)))
    results = {p.id: out / p.results_name for p in plan.points}
    finished = {
        pid: p.read_bytes() for pid, p in results.items() if p.is_file() and json.loads(p.read_text())["complete"]
    }
    partial = [pid for pid, p in results.items() if p.is_file() and pid not in finished]
    assert len(finished) == 3 and len(partial) == 1
    killed = partial[0]
    killed_records = json.loads(results[killed].read_text())["records"]
    assert len(killed_records) == 1

    counter.unlink()
    count_in_process(monkeypatch, counter)
    assert sweep_cli(["sweep", str(grid_path), "-o", str(out)]) == 0
    # the rerun: no forward, no SAE fit, no guide fit (the killed point's checkpoint is reused)
    assert counts(counter) == {"forward": 0, "sae": 0, "fit": 2}  # only the 2 spg-topk guides, never fitted yet
    assert all(results[pid].read_bytes() == data for pid, data in finished.items())  # finished points untouched
    resumed = json.loads(results[killed].read_text())
    assert resumed["complete"] and len(resumed["records"]) == 2
    assert resumed["records"][0] == killed_records[0]  # continued after its last finished category
    manifest = json.loads((out / "_sweep" / "manifest.json").read_text())
    assert {e["status"] for e in manifest["points"].values()} == {"done"} and manifest["threads"] == 1
    assert all(json.loads(p.read_text())["device"].endswith(", 1 threads") for p in results.values())

    # at equal thread counts a point equals its standalone run (fresh cache: its own forwards and fits)
    monkeypatch.setenv("ZSAD_BENCH_CACHE", str(tmp_path / "alone-cache"))
    point = next(p for p in plan.points if p.id == killed)
    spec = spec_from_options(point.options)
    spec.out, spec.progress = tmp_path / "alone.json", False
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_experiment(spec)
    finally:
        torch.set_num_threads(threads)
    assert metrics_by_category(tmp_path / "alone.json") == metrics_by_category(results[killed])

    capsys.readouterr()
    assert main(["table", str(out), "--metric", "image_auroc", "--no-main"]) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("| Category"))
    assert sorted(c.strip() for c in header.split("|")[2:-1]) == sorted(p.label for p in plan.points)
