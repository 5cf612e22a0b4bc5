"""Plan -> execute -> record: a plan saved as JSON, run as two shards in two processes, equals the sequential run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TOY_PLUGIN_DIR
from zsad_bench.errors import ZsadError
from zsad_bench.results import RunResult
from zsad_bench.runner import Plan, RunSpec, execute, plan_run, run_experiment

SPEC = dict(
    method="toy-zeroshot",
    seeds=[1, 2],
    categories=["cap", "weave"],  # one target category per leg of the synthetic protocol
    image_size=64,
    method_config={"noise": 0.1},
    progress=False,
)


def _records(result: RunResult) -> tuple[dict, dict, dict]:
    cats = {(r.seed, r.protocol, r.target, r.category): (r.n_images, r.metrics) for r in result.records}
    images = {(i.seed, i.leg, i.target, i.path): (i.category, i.defect, i.label, i.score) for i in result.images}
    fits = {(f.seed, f.leg): (Path(f.checkpoint).name, f.summary) for f in result.fits}
    return cats, images, fits


def test_plan_json_round_trip_and_structure(tmp_path: Path) -> None:
    plan, _ = plan_run(RunSpec(**SPEC))
    again = Plan.load(plan.save(tmp_path / "plan.json"))
    assert again.to_json() == plan.to_json()
    # 2 seeds x 2 legs x 1 category each
    assert [(i.seed, i.leg, i.category) for i in plan.items] == [
        (1, "synthetic:textures-to-objects", "cap"),
        (1, "synthetic:objects-to-textures", "weave"),
        (2, "synthetic:textures-to-objects", "cap"),
        (2, "synthetic:objects-to-textures", "weave"),
    ]
    first = plan.items[0]
    fit = plan.nodes[first.deps[0]]
    assert fit.kind == "fit" and fit.seed == 1 and fit.leg == "synthetic:textures-to-objects"
    kinds = {plan.nodes[d].kind for d in fit.deps}
    assert kinds == {"features", "shared"}
    assert plan.nodes[first.deps[1]].kind == "features" and plan.nodes[first.deps[1]].category == "cap"
    with pytest.raises(ZsadError, match="plan item 9 does not exist"):
        execute(plan, tmp_path / "r.json", items=[9])


def test_two_processes_fill_one_store_like_the_sequential_run(tmp_path: Path) -> None:
    sequential, _ = run_experiment(RunSpec(**SPEC, out=tmp_path / "seq.json"))
    plan, _ = plan_run(RunSpec(**SPEC))
    plan_file = plan.save(tmp_path / "plan.json")
    out = tmp_path / "sharded.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TOY_PLUGIN_DIR), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "zsad_bench.runner", str(plan_file), "--out", str(out), "--items"]
    procs = [subprocess.Popen([*cmd, items], env=env, stderr=subprocess.PIPE, text=True) for items in ("0,3", "1,2")]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    sharded = RunResult.load(out)
    assert sharded.complete and sequential.complete
    assert _records(sharded) == _records(sequential)
    assert len(sharded.images) == sum(r.n_images for r in sharded.records) == 4 * 25
    # the header is the plan's, whoever wrote first
    assert sharded.run_id == plan.header.run_id and json.loads(out.read_text())["schema"] == "zsad-bench/results/v2"
