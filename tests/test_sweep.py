"""Sweep config files, grid expansion, point ids, dry-run states and the local engine's device assignment.

No method is trained here (see test_sweep_e2e.py); only the grid's datasets are opened.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import pytest

from zsad_bench.cli.main import main
from zsad_bench.cli.run import given_options, run_actions
from zsad_bench.errors import ZsadError
from zsad_bench.runner import RunSpec
from zsad_bench.sweep.config import apply_run_config, key_line, load_run_config
from zsad_bench.sweep.engines import LocalEngine, Task
from zsad_bench.sweep.plan import load_grid, make_plan, points_of

GRID = """\
[sweep]
threads = 1

[base]
backbone = "effnet-lite0"
image_size = 64
aux = ["synthetic:objects"]
aux_categories = "cap"
target = ["synthetic:textures"]
categories = "weave"
set = { sae_width = 64, sae_epochs = 1 }

[grid]
method = ["spg", "spg-topk"]
set.sae_k = [4, 8]
seed = [111, 222]

[[exclude]]
method = "spg-topk"
seed = 222
"""


def write(tmp_path: Path, text: str, name: str = "grid.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_grid_expands_with_exclusions_and_shared_stages(tmp_path: Path) -> None:
    grid = load_grid(write(tmp_path, GRID))
    points = points_of(grid)
    # 2 methods x 2 k x 2 seeds = 8, minus spg-topk at seed 222 (2 points)
    assert len(points) == 6 and grid.threads == 1
    combos = {(p.options["method"], p.resolved["method_config"]["sae_k"], p.resolved["seeds"][0]) for p in points}
    assert ("spg-topk", 4, 222) not in combos and ("spg", 8, 222) in combos
    # the sweep's [base] and axes reach the method config, defaults resolved (sae_lr is SPG's default)
    assert all(p.resolved["method_config"]["sae_width"] == 64 for p in points)
    assert all(p.resolved["method_config"]["sae_lr"] == 1e-3 for p in points)
    # labels name the varying axes except the seed (a table averages seeds)
    assert {p.label for p in points} == {"spg sae_k=4", "spg sae_k=8", "spg-topk sae_k=4", "spg-topk sae_k=8"}
    plan = make_plan(points)
    # one feature group per dataset (aux cap: 25 images, target weave: 25 test images)
    assert sorted(sum(map(len, s.payload["blocks"])) for s in plan.fills) == [25, 25]
    # SAE groups: (k, seed); spg and spg-topk share the SAE family -> 4 groups over 6 points
    assert len(set(plan.leaders.values())) == 4
    first = {}
    for p in points:
        first.setdefault((p.resolved["method_config"]["sae_k"], p.resolved["seeds"][0]), p.id)
    assert set(plan.leaders.values()) == set(first.values())


def test_fill_shards_keep_the_runners_batches() -> None:
    from zsad_bench.sweep.plan import shard_stages

    units = [list(range(25)), list(range(100, 125)), list(range(200, 203))]
    stages = shard_stages("k", {"batch_size": 8}, units, 3)
    blocks = [b for s in stages for b in s.payload["blocks"]]
    # 53 images / 3 shards -> blocks of up to 24 (a multiple of 8), cut only at unit starts + multiples of 24
    assert sorted(map(tuple, blocks)) == sorted(
        [tuple(range(24)), (24,), tuple(range(100, 124)), (124,), tuple(range(200, 203))]
    )
    assert sorted(sum(map(len, s.payload["blocks"])) for s in stages) == [5, 24, 24]  # least-loaded first
    assert [s.id for s in stages] == ["fill-k-1of3", "fill-k-2of3", "fill-k-3of3"]


def test_shipped_spg_paper_config_is_the_main_table_and_backbone_ablation() -> None:
    grid = load_grid(Path(__file__).resolve().parents[1] / "configs" / "spg_paper.toml")
    points = points_of(grid)
    assert len(points) == 8 and {p.options["method"] for p in points} == {"spg"}
    cells = {(p.options["protocol"], p.resolved["backbone"], p.resolved["image_size"]) for p in points}
    for protocol in ("visa-to-mvtec", "mvtec-to-visa"):
        for backbone, size in (("dinov3", 448), ("dinov2", 448), ("openclip", 518), ("siglip", 448)):
            assert (protocol, backbone, size) in cells


def test_point_ids_survive_grid_edits(tmp_path: Path) -> None:
    before = {p.label + str(p.resolved["seeds"]): p.id for p in points_of(load_grid(write(tmp_path, GRID)))}
    # a new axis value, a reordered axis, an explicit default and run-only options leave old points alone
    edited = GRID.replace("set.sae_k = [4, 8]", "set.sae_k = [8, 4, 16]").replace(
        "image_size = 64", 'image_size = 64\ndevice = "cpu"\nquiet = true\nset.sae_lr = 0.001'
    )
    edited = edited.replace("set = { sae_width = 64, sae_epochs = 1 }\n", "")
    edited = edited.replace("[base]", "[base]\nset.sae_width = 64\nset.sae_epochs = 1")
    after = {p.label + str(p.resolved["seeds"]): p.id for p in points_of(load_grid(write(tmp_path, edited, "e.toml")))}
    assert len(after) == 9
    assert all(after[k] == v for k, v in before.items())
    # a changed value is a new point
    changed = points_of(load_grid(write(tmp_path, GRID.replace("sae_epochs = 1", "sae_epochs = 2"), "c.toml")))
    assert not {p.id for p in changed} & set(before.values())


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (GRID.replace("image_size = 64", "image_sise = 64"), 6, "image_sise: unknown option"),
        (GRID.replace("image_size = 64", 'image_size = "big"'), 6, "image_size: expected an integer"),
        (GRID.replace('method = ["spg", "spg-topk"]', 'method = "spg"'), 14, "an axis is a non-empty list"),
        (GRID.replace("set.sae_k = [4, 8]", "set.sae_kk = [4, 8]"), 15, "has no option 'sae_kk'"),
        (GRID.replace("sae_epochs = 1", "sae_epochs = -1"), 11, "spg.sae_epochs=-1: must be >= 0"),
        (GRID.replace('"spg-topk"]', '"spg-topk", "spgg"]'), 14, "spgg"),
        (GRID.replace("seed = 222\n", "shots = 1\n"), 20, "exclude.shots: not a [grid] axis"),
        (GRID.replace("threads = 1", "threads = 0"), 2, "sweep.threads: expected an integer >= 1"),
        (GRID.replace("[grid]", "[grdi]"), 13, "unknown section [grdi]"),
        (GRID.replace('aux_categories = "cap"', 'out = "x.json"'), 8, "out: set by the sweep"),
        (GRID.replace("[sweep]", "[sweep"), 0, "invalid TOML"),
        (GRID.replace('backbone = "effnet-lite0"', 'backbone = "dinov9"'), 5, "unknown backbone 'dinov9'; known: "),
    ],
)
def test_bad_grids_are_one_line_errors_with_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ZsadError) as err:
        points_of(load_grid(path))
    msg = str(err.value)
    assert "\n" not in msg and message in msg and msg.startswith(str(path))
    if line:
        assert msg.startswith(f"{path}:{line}: "), msg


def test_key_line_finds_dotted_inline_and_array_table_keys() -> None:
    text = GRID + '\n[[exclude]]\nmethod = "spg"\nset = { sae_k = 8 }\n'
    assert key_line(text, "grid", "set.sae_k") == 15
    assert key_line(text, "base", "set.sae_epochs") == 11  # inside the inline table
    assert key_line(text, "exclude", "method", occurrence=1) == 23
    assert key_line(text, "exclude", "set.sae_k", occurrence=1) == 24


def test_run_config_maps_to_run_options_and_flags_override(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'method = "spg"\nimage-size = 64\nseed = [1, 2]\naux = "synthetic:objects"\nquiet = true\n'
        "set = { sae_width = 64, sae_betas = [0.5, 0.9] }\n",
        "run.toml",
    )
    cfg = load_run_config(path, run_actions())
    assert cfg == {
        "method": "spg",
        "image_size": 64,
        "seed": [1, 2],
        "aux": ["synthetic:objects"],
        "quiet": True,
        "set": ["sae_width=64", "sae_betas=0.5,0.9"],
    }
    from zsad_bench.cli import run as run_cli

    parser = argparse.ArgumentParser()
    run_cli.add_parser(parser.add_subparsers(dest="command"))
    argv = ["run", "-m", "winclip", "--image-size", "240"]
    args = parser.parse_args(argv)
    apply_run_config(args, path, run_actions(), given_options(argv))
    assert (args.method, args.image_size, args.seed, args.quiet) == ("winclip", 240, [1, 2], True)
    with pytest.raises(ZsadError, match=r"run.toml:2: image-size: expected an integer"):
        load_run_config(write(tmp_path, 'method = "spg"\nimage-size = 6.5\n', "run.toml"), run_actions())
    with pytest.raises(ZsadError, match=r"run.toml:2: dvice: unknown option; options: "):
        load_run_config(write(tmp_path, 'method = "spg"\ndvice = "cpu"\n', "run.toml"), run_actions())


class _Resolved(Exception):
    """Raised by the stand-in ``run_experiment``: the RunSpec that ``zsad-bench run`` resolved."""

    def __init__(self, spec: RunSpec) -> None:
        super().__init__()
        self.spec = spec


def _resolve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, toml: str, *flags: str) -> RunSpec:
    """The RunSpec of ``zsad-bench run --config FILE FLAGS`` through the real parse path (nothing is run)."""
    import zsad_bench.runner

    def stop(spec: RunSpec) -> None:
        raise _Resolved(spec)

    monkeypatch.setattr(zsad_bench.runner, "run_experiment", stop)
    with pytest.raises(_Resolved) as resolved:
        main(["run", "--config", str(write(tmp_path, 'method = "spg"\n' + toml, "run.toml")), *flags])
    return resolved.value.spec


@pytest.mark.parametrize(
    ("toml", "flags", "field", "expected"),
    [
        ("seed = [3]\n", ["--seed", "0"], "seeds", [0]),
        ("seed = [3]\n", ["--seed", "111"], "seeds", [111]),  # the default, given: still wins
        ("seed = [3]\n", [], "seeds", [3]),
        ('device = "cpu"\n', [], "device", "cpu"),
        ('device = "cpu"\n', ["--device", "auto"], "device", "auto"),
        ('preset = "matched"\n', ["--preset", "paper"], "preset", "paper"),
        ("batch-size = 2\n", ["--batch-size", "8"], "batch_size", 8),
        ('aux-split = "train"\n', ["--aux-split", "test", "--debug"], "aux_split", "test"),
        ("quiet = true\n", [], "progress", False),
        ("set.sigma = 2\n", ["--set", "agg_tau=0.5"], "method_config", {"sigma": "2", "agg_tau": "0.5"}),
        ("set.sigma = 2\n", ["--set", "sigma=3"], "method_config", {"sigma": "3"}),
        (
            'set = ["sigma=2", "agg-tau=0.1"]\n',
            ["--set", "agg-tau=0.5"],
            "method_config",
            {"sigma": "2", "agg_tau": "0.5"},
        ),
        ('set.aggregation = "max"\n', ["--aggregation", "lse"], "method_config", {"aggregation": "lse"}),
        (
            "set.agg_tau = 0.1\n",
            ["--tau", "0.5", "--set", "sigma=3"],
            "method_config",
            {"agg_tau": "0.5", "sigma": "3"},
        ),
        ('set.aggregation = "max"\n', [], "method_config", {"aggregation": "max"}),
    ],
)
def test_run_config_loses_to_every_option_given_on_the_command_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, toml: str, flags: list[str], field: str, expected: object
) -> None:
    assert getattr(_resolve(monkeypatch, tmp_path, toml, *flags), field) == expected


def test_dry_run_lists_states(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from zsad_bench.results import RunResult

    grid = load_grid(write(tmp_path, GRID))
    plan = make_plan(points_of(grid))
    out = tmp_path / "out"
    out.mkdir()
    first, second = plan.points[0], plan.points[1]
    stub = RunResult("r", "spg", "SPG", "effnet-lite0", "p", [], [], {}, [111], "zero-shot", {}, complete=True)
    stub.save(out / first.results_name)
    stub.complete = False
    stub.save(out / second.results_name)
    assert sweep_cli(["sweep", str(tmp_path / "grid.toml"), "-o", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    state = {ln.split()[1]: ln.split()[2] for ln in lines if ln.strip().startswith("point ")}
    assert state[first.id] == "done" and state[second.id] == "resume"
    assert sum(v == "to" for v in state.values()) == 4  # "to run"
    assert sum(ln.strip().startswith("stage ") for ln in lines) == 2


def test_missing_ray_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    write(tmp_path, GRID)
    with pytest.raises(ZsadError, match=r"^--engine ray needs Ray; install it with: pip install 'zsad-bench\[ray\]'$"):
        sweep_cli(["sweep", str(tmp_path / "grid.toml"), "-o", str(tmp_path / "o"), "--engine", "ray"])


def sweep_cli(argv: list[str]) -> int:
    """Parse ``argv`` with the sweep command module (as ``zsad-bench`` does) and run it."""
    from zsad_bench.cli import sweep

    parser = argparse.ArgumentParser(prog="zsad-bench")
    sweep.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def rendezvous_task(payload: dict) -> dict:
    """Fake point for the pool: registers its worker, then waits until both workers hold a task."""
    folder = Path(payload["dir"])
    (folder / f"{os.getpid()}-{payload['device']}").touch()
    deadline = time.monotonic() + 120
    while len({p.name.split("-")[0] for p in folder.iterdir()}) < 2 and payload["wait"]:
        if time.monotonic() > deadline:
            raise TimeoutError("the second worker never started")
        time.sleep(0.05)
    return {"id": payload["id"], "status": "done", "pid": os.getpid(), "device": payload["device"]}


def test_local_engine_pins_one_device_per_worker_process(tmp_path: Path) -> None:
    devices = ["cuda:0", "cuda:1"]  # a fake GPU list: the fake task never touches a device
    engine = LocalEngine(devices, task_fn=rendezvous_task)
    tasks = [Task(f"t{i}", {"id": f"t{i}", "dir": str(tmp_path), "wait": i < 2}) for i in range(5)]
    tasks[4].deps = ["t0", "t1"]
    events = list(engine.run(tasks))
    done = [e[2] for e in events if e[0] == "done"]
    assert sorted(d["id"] for d in done) == [f"t{i}" for i in range(5)]
    by_pid: dict[int, set[str]] = {}
    for d in done:
        by_pid.setdefault(d["pid"], set()).add(d["device"])
    assert len(by_pid) == 2 and os.getpid() not in by_pid  # two worker processes, not this one
    assert sorted(d for ds in by_pid.values() for d in ds) == devices  # each worker kept one device
    starts = next(i for i, e in enumerate(events) if e == ("start", "t4"))  # t4 waits for its dependencies
    assert all(i < starts for i, e in enumerate(events) if e[0] == "done" and e[1] in ("t0", "t1"))


def test_ablate_tau_is_one_shared_fit_and_labels_name_the_points(tmp_path: Path) -> None:
    from zsad_bench.cli import ablate

    parser = argparse.ArgumentParser()
    ablate.add_parser(parser.add_subparsers(dest="command"))
    argv = ["ablate", "tau", "--taus", "0.5", "5", "--backbone", "effnet-lite0", "--image-size", "64"]
    args = parser.parse_args(
        [*argv, "--aux", "synthetic:objects", "--target", "synthetic:textures", "--set", "sae_k=4"]
    )
    args.method = "spg"
    points = points_of(ablate.ablation_grid(args))
    assert [p.results_name for p in points] == [
        "SPG_max.json",
        "SPG_mean.json",
        "SPG_lse_tau=0.5.json",
        "SPG_lse_tau=5.json",
    ]
    assert {p.resolved["method_config"]["sae_k"] for p in points} == {4}  # the user's --set reaches every point
    plan = make_plan(points)
    assert set(plan.leaders.values()) == {points[0].id}  # aggregation is inference-only: one SAE for all


def fill_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> argparse.Namespace:
    """``cache fill`` of synthetic:objects/cap (test split, spg's layers at 64 px) into a cache under ``tmp_path``."""
    from zsad_bench.cli import cache

    monkeypatch.setenv("ZSAD_BENCH_CACHE", str(tmp_path / "cache"))
    parser = argparse.ArgumentParser()
    cache.add_parser(parser.add_subparsers(dest="command"))
    argv = ["cache", "fill", "--backbone", "effnet-lite0", "-m", "spg", "--image-size", "64", "synthetic:objects"]
    return parser.parse_args([*argv, "--categories", "cap", "--split", "test", "--devices", "cpu", *extra])


def count_forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch sizes of every backbone forward the feature store makes from now on."""
    from zsad_bench.features import FeatureStore

    computed: list[int] = []
    orig = FeatureStore._compute
    monkeypatch.setattr(FeatureStore, "_compute", lambda self, idx: (computed.append(len(idx)), orig(self, idx))[1])
    return computed


def test_cache_fill_extracts_once_and_runs_then_hit_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = fill_args(tmp_path, monkeypatch, "--threads", "1", "--shards", "2")
    assert args.func(args) == 0
    assert "25 images in 2 shard(s), 25 computed, 0 already cached" in capsys.readouterr().out
    assert args.func(args) == 0
    assert "25 images in 2 shard(s), 0 computed, 25 already cached" in capsys.readouterr().out
    # a run over the same images (spg's layers, the same input size) does no backbone forward
    computed = count_forwards(monkeypatch)
    from zsad_bench.runner import RunSpec, run_experiment

    spec = RunSpec(
        "spg",
        backbone="effnet-lite0",
        image_size=64,
        protocol=None,
        aux=["synthetic:objects"],
        targets=["synthetic:objects"],
        aux_categories=["cap"],
        categories=["cap"],
        method_config={"sae_width": "64", "sae_k": "4", "sae_epochs": "1", "guide_epochs": "1"},
        out=tmp_path / "run.json",
        progress=False,
    )
    run_experiment(spec)
    assert sum(computed) == 0


def test_failed_points_are_listed_with_their_reason_and_the_sweep_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import zsad_bench.sweep as sweep_pkg

    plan = make_plan(points_of(load_grid(write(tmp_path, GRID))))
    bad = plan.points[2].id

    def fake(payload: dict) -> dict:
        if payload["id"] == bad:
            return {"id": bad, "status": "failed", "reason": "tests: this point fails"}
        return {"id": payload["id"], "status": "done", "computed": 0, "cached": 0}

    monkeypatch.setattr(sweep_pkg, "build_engine", lambda args, threads, gpus: (LocalEngine(["cpu"], fake), 1, 0.0))
    assert sweep_cli(["sweep", str(tmp_path / "grid.toml"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "points 5/6 done, 0 running, 1 failed" in err
    tail = err.split("[sweep] 1 point(s) failed:\n")[1].splitlines()
    assert tail == [
        f"  {bad} {plan.points[2].label}: tests: this point fails (log: {tmp_path / 'out'}/_sweep/logs/{bad}.log)"
    ]
    manifest = json.loads((tmp_path / "out" / "_sweep" / "manifest.json").read_text())
    assert (
        manifest["points"][bad]["status"] == "failed" and manifest["points"][bad]["reason"] == "tests: this point fails"
    )


def test_cache_fill_in_bf16_is_what_a_bf16_run_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The precision is part of the cache key: a bf16 fill serves a bf16 run (no forward), not an fp32 one."""
    from zsad_bench.features import FeatureCache

    args = fill_args(tmp_path, monkeypatch, "--precision", "bf16")
    assert args.func(args) == 0
    assert [g["precision"] for g in FeatureCache().info()["groups"]] == ["bf16"]
    computed = count_forwards(monkeypatch)
    from zsad_bench.runner import RunSpec, run_experiment

    spec = RunSpec(
        "control-featnorm",
        backbone="effnet-lite0",
        image_size=64,
        protocol=None,
        targets=["synthetic:objects"],
        categories=["cap"],
        precision="bf16",
        out=tmp_path / "bf16.json",
        progress=False,
    )
    run_experiment(spec)
    assert sum(computed) == 0
    run_experiment(dataclasses.replace(spec, precision="fp32", out=tmp_path / "fp32.json"))
    assert sum(computed) == 25  # the fp32 run extracts its own features


@pytest.mark.parametrize(
    "argv",
    [
        ["cache", "fill", "-b", "dinov9", "synthetic:objects", "--devices", "cpu"],
        ["ablate", "backbone", "--backbones", "effnet-lite0", "dinov9:448", "--dry-run", "--out-dir", "OUT"],
    ],
)
def test_unknown_backbone_is_refused_before_any_work(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from zsad_bench.cli.main import main

    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("zsad-bench: error: ") and "unknown backbone 'dinov9'" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
