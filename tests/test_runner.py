"""End-to-end runner behaviour: protocols, results files, checkpoints, resume after SIGKILL, determinism."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TOY_PLUGIN_DIR
from zsad_bench.cli.main import main
from zsad_bench.detector import get_method_class
from zsad_bench.errors import ZsadError
from zsad_bench.protocols import resolve_protocol
from zsad_bench.results import RunResult
from zsad_bench.runner import RunSpec, run_experiment


def _metrics(result: RunResult) -> dict[tuple, dict[str, float]]:
    return {(r.seed, r.protocol, r.category): r.metrics for r in result.records}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for m, v in a[key].items():
            w = b[key][m]
            assert (math.isnan(v) and math.isnan(w)) or v == w, (key, m, v, w)


def test_named_protocols(tmp_path: Path) -> None:
    legs = resolve_protocol("synthetic")
    assert [leg.name for leg in legs] == ["synthetic:textures-to-objects", "synthetic:objects-to-textures"]
    (tmp_path / "mvtec_ad").mkdir()
    (tmp_path / "visa").mkdir()
    (leg,) = resolve_protocol("visa-to-mvtec", data_root=tmp_path)
    assert leg.aux == (f"visa:{tmp_path / 'visa'}",) and leg.targets == (f"mvtec:{tmp_path / 'mvtec_ad'}",)
    with pytest.raises(ZsadError, match=r"protocol 'mvtec-to-visa' needs --data-root"):
        resolve_protocol("mvtec-to-visa")
    with pytest.raises(ZsadError, match=r"unknown protocol 'visa2mvtec'; known: synthetic"):
        resolve_protocol("visa2mvtec", data_root=tmp_path)
    with pytest.raises(ZsadError, match=r"no mtd dataset under --data-root"):
        resolve_protocol("realmini", data_root=tmp_path)


def test_learning_type_refusals() -> None:
    with pytest.raises(ZsadError, match=r"zero-shot and needs an auxiliary dataset"):
        run_experiment(RunSpec("toy-zeroshot", protocol=None, targets=["synthetic:objects"], progress=False))
    with pytest.raises(ZsadError, match=r"zero-shot .* drop --shots"):
        run_experiment(RunSpec("toy-zeroshot", shots=2, progress=False))


def test_synthetic_run_writes_results_reuses_checkpoint_and_is_deterministic(tmp_path: Path) -> None:
    cls = get_method_class("toy-zeroshot")
    spec = dict(method="toy-zeroshot", method_config={"noise": 0.05}, progress=False)
    res1, path1 = run_experiment(RunSpec(**spec, out=tmp_path / "a.json"))
    fits_after_first = cls.fits
    res2, _ = run_experiment(RunSpec(**spec, out=tmp_path / "b.json"))
    assert cls.fits == fits_after_first, "second run must reuse the fitted checkpoints"
    _assert_same(_metrics(res1), _metrics(res2))

    saved = RunResult.load(path1)
    assert saved.complete and saved.method == "toy-zeroshot" and saved.backbone == "effnet-lite0"
    legs = {r.protocol for r in saved.records}
    assert legs == {"synthetic:textures-to-objects", "synthetic:objects-to-textures"}
    assert {"aupro", "aupro_cflow", "pixel_auroc", "image_auroc"} <= set(saved.metric_variants)
    assert saved.versions["torch"] and saved.config["method"] == {"sleep": 0.0, "noise": 0.05}
    assert all(Path(p).exists() for p in saved.artifacts.values())
    csv_lines = path1.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[0] == "protocol,metric,category,method,backbone,seed,target,value"
    assert all(r.n_images == 25 for r in saved.records)
    assert all(0.0 <= v <= 1.0 for r in saved.records for v in r.metrics.values())

    # a different seed changes the (seeded) fit
    res3, _ = run_experiment(RunSpec(**spec, seeds=[7], out=tmp_path / "c.json"))
    assert [r.metrics for r in res3.records] != [r.metrics for r in res1.records]


def test_existing_results_file_is_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    out.write_text("{}")
    with pytest.raises(ZsadError, match=r"r.json: results file exists; pass --resume"):
        run_experiment(RunSpec("toy-zeroshot", out=out, progress=False))
    assert out.read_text() == "{}"


def test_resume_with_other_config_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    run_experiment(RunSpec("toy-zeroshot", out=out, progress=False))
    with pytest.raises(ZsadError, match=r"--resume with a different config"):
        run_experiment(RunSpec("toy-zeroshot", out=out, resume=True, method_config={"noise": 1.0}, progress=False))


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(TOY_PLUGIN_DIR)}
    base = [sys.executable, "-m", "zsad_bench.cli.main", "run", "--method", "toy-zeroshot", "--quiet"]
    killed = tmp_path / "killed.json"
    proc = subprocess.Popen(
        [*base, "--set", "sleep=0.4", "--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 240
    while time.time() < deadline:
        if killed.exists() and json.loads(killed.read_text())["records"]:
            break
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {proc.stderr.read().decode()}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = RunResult.load(killed)
    assert not partial.complete and 1 <= len(partial.records) < 6

    resumed = subprocess.run(
        [*base, "--set", "sleep=0.4", "--out", str(killed), "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    full = tmp_path / "full.json"
    clean = subprocess.run(
        [*base, "--set", "sleep=0.4", "--out", str(full)], env=env, capture_output=True, text=True, timeout=600
    )
    assert clean.returncode == 0, clean.stderr
    a, b = RunResult.load(killed), RunResult.load(full)
    assert a.complete and len(a.records) == len(b.records)
    _assert_same(_metrics(a), _metrics(b))


def test_cli_run_prints_table_and_table_command_rerenders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli.json"
    assert main(["run", "--method", "toy-zeroshot", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Toy" in printed and "results written to" in printed
    assert main(["table", str(out), "--format", "csv"]) == 0
    csv = capsys.readouterr().out.splitlines()
    assert csv[0] == "protocol,metric,category,method,value"
    assert any(",mean,Toy," in line for line in csv)


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--method", "nope", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zsad-bench: error: unknown method 'nope'")


@pytest.mark.realmini
def test_realmini_protocol_end_to_end(realmini: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rm.json"
    res, _ = run_experiment(RunSpec("toy-zeroshot", protocol="realmini", data_root=realmini, out=out, progress=False))
    cats = {(r.protocol, r.category) for r in res.records}
    assert cats == {
        ("realmini:visa-to-mvtec+mtd", "bottle"),
        ("realmini:visa-to-mvtec+mtd", "magnetic_tile"),
        ("realmini:mvtec+mtd-to-visa", "capsules"),
        ("realmini:mvtec+mtd-to-visa", "macaroni1"),
    }
    bottle = next(r for r in res.records if r.category == "bottle")
    assert bottle.n_images == 83
    assert main(["table", str(out), "--format", "md"]) == 0
    assert "bottle" in capsys.readouterr().out


def test_categories_may_span_legs_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    res, _ = run_experiment(
        RunSpec("toy-zeroshot", categories=["weave", "cap"], out=tmp_path / "c.json", progress=False)
    )
    assert {(r.protocol, r.category) for r in res.records} == {
        ("synthetic:textures-to-objects", "cap"),
        ("synthetic:objects-to-textures", "weave"),
    }
    unknown = r"synthetic:objects \+ synthetic:textures: unknown target category bottle; available: "
    with pytest.raises(ZsadError, match=unknown):
        run_experiment(RunSpec("toy-zeroshot", categories=["bottle"], out=tmp_path / "d.json", progress=False))


def test_few_shot_legs_are_named_after_their_targets(tmp_path: Path) -> None:
    from zsad_bench.protocols import few_shot_legs

    legs = few_shot_legs(resolve_protocol("synthetic"))
    assert [(leg.name, leg.aux) for leg in legs] == [("synthetic:objects", ()), ("synthetic:textures", ())]
    (tmp_path / "mvtec_ad").mkdir()
    (tmp_path / "visa").mkdir()
    assert [leg.name for leg in few_shot_legs(resolve_protocol("visa-to-mvtec", data_root=tmp_path))] == ["mvtec"]


def test_option_typos_are_reported_before_backbone_weights_are_looked_up() -> None:
    # dinov3 weights are absent here: the typo must still be what the user hears about
    with pytest.raises(ZsadError, match=r"method 'spg' has no option 'sae_widht'; options: sae_width"):
        run_experiment(RunSpec("spg", backbone="dinov3", method_config={"sae_widht": "8"}, progress=False))
    with pytest.raises(ZsadError, match=r"method 'winclip' does not run on backbone 'effnet-lite0'"):
        run_experiment(RunSpec("winclip", backbone="effnet-lite0", progress=False))


def test_aggregation_flags_map_to_method_options(capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--method", "toy-zeroshot", "--aggregation", "lse", "--tau", "0.5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "method 'toy-zeroshot' has no option 'aggregation'" in err
