"""Results files v2: typed records, v1 files still read, hand-edited files refused with one line."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from zsad_bench.errors import ZsadError
from zsad_bench.results import SCHEMA, SCHEMA_V1, CategoryRecord, FitRecord, ImageRecord, RunResult, validate

HEADER = dict(
    run_id="r",
    method="toy-zeroshot",
    method_label="Toy",
    backbone="effnet-lite0",
    protocol="synthetic",
    aux=["synthetic:textures"],
    targets=["synthetic:objects"],
    config={"method": {}},
    seeds=[111],
    learning_type="zero-shot",
    metric_variants={"image_auroc": "AUROC"},
)


def _v2() -> dict:
    run = RunResult(
        **HEADER,
        records=[CategoryRecord(111, "synthetic:objects", "cap", 2, {"image_auroc": 0.75}, 1.0, "leg")],
        images=[ImageRecord(111, "leg", "synthetic:objects", "cap", "/a.png", "crack", 1, 0.9)],
        fits=[FitRecord(111, "leg", "/c.safetensors", 2.5, {"guide_sparsity": 7.0})],
    )
    return run.to_json()


def test_v2_round_trip_and_v1_view(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    RunResult.from_json(_v2()).save(path)
    back = RunResult.load(path)
    assert back.schema == SCHEMA == "zsad-bench/results/v2"
    assert back.images[0] == ImageRecord(111, "leg", "synthetic:objects", "cap", "/a.png", "crack", 1, 0.9)
    assert back.artifacts == {"checkpoint|leg|seed=111": "/c.safetensors"}
    assert back.summary == {"guide_sparsity|leg|seed=111": 7.0}
    assert "artifacts" not in json.loads(path.read_text())


def test_v1_file_reads_string_keys_as_fit_records() -> None:
    data = _v2()
    for key in ("images", "fits"):
        del data[key]
    data.update(
        schema=SCHEMA_V1,
        artifacts={"checkpoint|a-to-b|seed=7": "/x.pt"},
        timings={"fit_s|a-to-b|seed=7": 3.0, "total_s": 9.0},
        summary={"guide_sparsity|a-to-b|seed=7": 12.0, "dead|a-to-b|seed=7": 1.0},
    )
    run = RunResult.from_json(data)
    assert run.images == []
    assert run.fits == [FitRecord(7, "a-to-b", "/x.pt", 3.0, {"guide_sparsity": 12.0, "dead": 1.0})]
    assert run.timings == {"total_s": 9.0}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["records"][0]["metrics"].update(image_auroc=11.69),
            r"records\[0\].metrics.image_auroc = 11.69 is not a fraction in \[0, 1\]",
        ),
        (lambda d: d.pop("method"), r"the file lacks 'method'"),
        (lambda d: d.update(seeds="111"), r"the file.seeds = '111' is not a list"),
        (lambda d: d["records"][0].update(seed="111"), r"records\[0\].seed = '111' is not an integer"),
        (lambda d: d["records"][0]["metrics"].update(image_auroc="high"), r"image_auroc = 'high' is not a fraction"),
        (
            lambda d: d.update(schema="zsad-bench/results/v9"),
            r"not a zsad-bench results file \(schema 'zsad-bench/results/v9'",
        ),
        (lambda d: d.update(records={}), r"'records' is not a list"),
        (lambda d: d["images"][0].update(score=None, label="1"), r"images\[0\].label = '1' is not an integer"),
        (lambda d: d.update(complete="yes"), r"complete = 'yes' is not true/false"),
        (
            lambda d: d["images"][0].update(label=2),
            r"images\[0\].label = 2 is not 0 \(good\) or 1 \(anomalous\); re-run",
        ),
    ],
)
def test_hand_edited_files_fail_with_one_line(edit, message: str) -> None:
    data = _v2()
    edit(data)
    with pytest.raises(ZsadError, match=message) as info:
        validate(data, "f.json")
    assert "\n" not in str(info.value) and str(info.value).startswith("f.json: ")


def test_null_metric_is_nan_and_valid() -> None:
    data = _v2()
    data["records"][0]["metrics"]["image_auroc"] = None
    run = RunResult.from_json(data)
    assert run.records[0].metrics["image_auroc"] != run.records[0].metrics["image_auroc"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_results_files_get_the_mode_open_gives(tmp_path: Path, umask: int, mode: int) -> None:
    path = tmp_path / "r.json"
    path.write_text("{}")
    path.chmod(0o600)  # as an earlier version wrote it: replaced, it takes the usual mode
    old = os.umask(umask)
    try:
        RunResult.from_json(_v2()).save(path, overwrite=True)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"r.json": mode, "r.csv": mode}  # and no temp file left behind


def test_generated_data_folder_in_the_cache_gets_the_mode_mkdir_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded data is generated in a temp folder renamed into the cache: not mkdtemp's 0700, which a
    shared cache's other users could not enter."""
    import zsad_bench.adapters.synthetic as synthetic

    monkeypatch.setenv("ZSAD_BENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(synthetic, "generate_synthetic", lambda out, seed: (out / "textures").mkdir())
    old = os.umask(0o022)
    try:
        final = synthetic.cached_synthetic(seed=7)
    finally:
        os.umask(old)
    assert stat.S_IMODE(final.stat().st_mode) == 0o755 and (final / "textures").is_dir()
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # no temp folder left behind
