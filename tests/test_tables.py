"""Result tables from results files: Markdown / LaTeX / CSV, reported columns, speed tables, bad files."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from zsad_bench.cli import table as table_cli
from zsad_bench.errors import ZsadError
from zsad_bench.results import CategoryRecord, RunResult
from zsad_bench.tables import load_reported, load_results, render, render_bench, reported_dir

SHARED_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def write_run(path: Path, label: str, backbone: str, per_seed: dict[int, dict[str, float]], protocol: str) -> Path:
    """A results file with image_auroc per category (fractions) for each seed."""
    records = [
        CategoryRecord(
            seed=seed, target="mvtec:/data", category=cat, n_images=10, metrics={"image_auroc": v}, protocol=protocol
        )
        for seed, cats in per_seed.items()
        for cat, v in cats.items()
    ]
    run = RunResult(
        run_id=path.stem, method=label.lower(), method_label=label, backbone=backbone, protocol=protocol, aux=[],
        targets=["mvtec:/data"], config={}, seeds=sorted(per_seed), learning_type="zero-shot",
        metric_variants={}, records=records, complete=True,
    )  # fmt: skip
    run.save(path)
    return path


@pytest.fixture
def two_runs(tmp_path: Path) -> Path:
    spg = {0: {"bottle": 0.9, "cable": 0.6}, 1: {"bottle": 0.8, "cable": 0.7}}
    write_run(tmp_path / "a.json", "SPG", "dinov3", spg, "visa-to-mvtec")
    write_run(tmp_path / "b.json", "Win_CLIP & co", "dinov3", {0: {"bottle": 0.95, "cable": 0.5}}, "visa-to-mvtec")
    return tmp_path


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    table_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["table", *argv])
    return args.func(args)


def md_table(text: str, title_start: str) -> list[list[str]]:
    """Cells of the pipe table that follows the title starting with ``title_start``."""
    block = text.split(f"**{title_start}", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in block.splitlines() if line.startswith("|") and not line.startswith("|:")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows]


def test_load_results_long_form(two_runs: Path) -> None:
    df = load_results([two_runs])  # a directory: its *.json
    assert len(df) == 6
    assert set(df["source"]) == {"measured"}
    assert sorted(df.loc[df["method"] == "SPG", "value"]) == [0.6, 0.7, 0.8, 0.9]


def test_markdown_per_category_mean_std_and_bold(two_runs: Path) -> None:
    text = render(load_results([two_runs / "a.json", two_runs / "b.json"]), "md")
    rows = md_table(text, "visa-to-mvtec - image_auroc")
    assert rows[0] == ["Category", "SPG", "Win_CLIP & co"]
    # SPG bottle: seeds 0.9 / 0.8 -> 85.0 ± 7.1 (sample std); Win_CLIP one seed -> no ±, best -> bold.
    assert rows[1] == ["bottle", "85.0 ± 7.1", "**95.0**"]
    assert rows[2] == ["cable", "**65.0 ± 7.1**", "50.0"]
    # Mean row: per-seed means 0.75 and 0.75 -> 75.0 ± 0.0; Win_CLIP (0.95 + 0.5) / 2 = 72.5.
    assert rows[3] == ["Mean", "**75.0 ± 0.0**", "72.5"]
    main = md_table(text, "Main table")
    assert main[0] == ["Method", "visa-to-mvtec image_auroc"]
    assert main[1:] == [["SPG", "**75.0 ± 0.0**"], ["Win_CLIP & co", "72.5"]]


def test_backbone_columns(tmp_path: Path) -> None:
    write_run(tmp_path / "a.json", "SPG", "dinov3", {0: {"bottle": 0.9}}, "visa-to-mvtec")
    write_run(tmp_path / "b.json", "SPG", "effnet-lite0", {0: {"bottle": 0.7}}, "visa-to-mvtec")
    df = load_results([tmp_path])
    assert md_table(render(df, "md"), "visa-to-mvtec")[0] == ["Category", "SPG (dinov3)", "SPG (effnet-lite0)"]
    assert md_table(render(df, "md", columns="backbone"), "visa-to-mvtec")[0] == ["Category", "dinov3", "effnet-lite0"]


def test_latex_structure(two_runs: Path) -> None:
    text = render(load_results([two_runs]), "latex")
    tables = re.findall(r"\\begin\{tabular\}\{(lr*)\}(.*?)\\end\{tabular\}", text, flags=re.S)
    assert len(tables) == 2  # per-category + main
    spec, body = tables[0]
    assert spec == "lrr"
    assert body.count(r"\toprule") == 1 and body.count(r"\bottomrule") == 1 and body.count(r"\midrule") == 2
    rows = [r.strip() for r in body.split(r"\\") if "&" in r.replace(r"\&", "")]
    for row in rows:
        cells = re.split(r"(?<!\\)&", row.split("rule")[-1])
        assert len(cells) == 3, row
    assert r"Win\_CLIP \& co" in body
    assert r"\textbf{95.0}" in body and r"85.0 $\pm$ 7.1" in body
    assert text.count(r"\begin{table}") == text.count(r"\end{table}") == 2
    assert r"\caption{visa-to-mvtec - image\_auroc (\%)" in text


def test_csv_long_form(two_runs: Path) -> None:
    rows = list(csv.reader(render(load_results([two_runs]), "csv").splitlines()))
    assert rows[0] == ["protocol", "metric", "category", "method", "value"]
    assert ["visa-to-mvtec", "image_auroc", "bottle", "SPG", "85.0"] in rows
    assert ["visa-to-mvtec", "image_auroc", "mean", "Win_CLIP & co", "72.5"] in rows
    assert len(rows) == 1 + 6


def test_reported_matches_shared_reference() -> None:
    """results/reported is an exact transcription (pixel_aupro -> aupro_cflow, values unchanged)."""
    if not SHARED_REFERENCE.is_dir():
        pytest.skip(f"reference CSVs not found at {SHARED_REFERENCE}")
    paper = pd.read_csv(SHARED_REFERENCE / "spg_paper" / "per_category.csv", dtype=str)
    ours = pd.read_csv(reported_dir() / "spg_paper_per_category.csv", dtype=str)
    assert list(paper["metric"].replace({"pixel_aupro": "aupro_cflow"})) == list(ours["metric"])
    for col in ("protocol", "category", "method", "value"):
        assert list(paper[col]) == list(ours[col])
    df = load_reported()
    assert {"aupro", "pixel_aupro"}.isdisjoint(df["metric"])  # the paper's AUPRO is the cflow variant


def test_with_reported_reproduces_table_s1(tmp_path: Path) -> None:
    """Measured visa_to_mvtec results + --with-reported: the paper's columns show its values exactly."""
    if not SHARED_REFERENCE.is_dir():
        pytest.skip(f"reference CSVs not found at {SHARED_REFERENCE}")
    write_run(tmp_path / "r.json", "Ours", "dinov3", {0: {"bottle": 0.5, "cable": 0.5}}, "visa_to_mvtec")
    out = tmp_path / "t.md"
    assert run_cli(str(tmp_path / "r.json"), "--with-reported", "--metric", "image_auroc", "--out", str(out)) == 0
    rows = md_table(out.read_text(), "visa-to-mvtec - image_auroc")
    header, body = rows[0], {r[0]: r[1:] for r in rows[1:]}
    paper = pd.read_csv(SHARED_REFERENCE / "spg_paper" / "per_category.csv", dtype=str)
    s1 = paper[(paper["protocol"] == "visa_to_mvtec") & (paper["metric"] == "image_auroc")]
    assert header[1] == "Ours"
    assert len(body) == s1["category"].nunique()  # 15 categories + Mean
    for r in s1.itertuples():
        cell = body["Mean" if r.category == "mean" else r.category][header.index(f"{r.method} (reported)") - 1]
        assert cell.strip("*") == r.value, (r.category, r.method)
    assert "mvtec-to-visa" not in out.read_text()  # reported tables only for measured protocols


def test_bench_table(tmp_path: Path) -> None:
    keys = {"method": "spg", "backbone": "effnet-lite0", "device": "cpu", "dtype": "float32", "batch_size": 8}
    row = {**keys, "component": "total", "images_per_s": 12.345, "p50_ms": 80.04, "p95_ms": 95.5, "peak_mem_mb": 812.4}
    row["overhead_vs_backbone"] = 0.25
    (tmp_path / "bench.json").write_text(json.dumps({"schema": "zsad-bench/bench/v1", "rows": [row]}))
    out = tmp_path / "bench.md"
    assert run_cli(str(tmp_path / "bench.json"), "--out", str(out)) == 0
    rows = md_table(out.read_text(), "Speed")
    assert rows[0][:6] == ["method", "backbone", "dtype", "batch_size", "component", "device"]
    assert rows[1] == ["spg", "effnet-lite0", "float32", "8", "total", "cpu", "12.3", "80.0", "95.5", "812", "+25.0%"]


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not valid JSON"), ('{"schema": "other/v9"}', "not a zsad-bench results or benchmark file")],
)
def test_bad_files_raise_one_line_errors(tmp_path: Path, content: str, message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(ZsadError, match=message) as info:
        load_results([bad])
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ZsadError, match="no such results file"):
        load_results([tmp_path / "missing.json"])


def test_fifo_as_results_file_is_named_for_what_it_is(tmp_path: Path) -> None:
    """A FIFO exists: "no such results file" sent the user looking for a missing file."""
    fifo = tmp_path / "r.json"
    os.mkfifo(fifo)
    with pytest.raises(ZsadError) as info:
        load_results([fifo])
    assert str(info.value) == f"{fifo}: not a regular file (a FIFO, socket or device); pass a results JSON file"


def test_duplicate_runs_are_refused(tmp_path: Path) -> None:
    write_run(tmp_path / "a.json", "SPG", "dinov3", {0: {"bottle": 0.9}}, "visa-to-mvtec")
    write_run(tmp_path / "b.json", "SPG", "dinov3", {0: {"bottle": 0.8}}, "visa-to-mvtec")
    with pytest.raises(ZsadError, match=r"a\.json and .*b\.json: both hold SPG seed 0"):
        render(load_results([tmp_path]), "md")


def test_few_shot_runs_keep_their_shots(tmp_path: Path) -> None:
    write_run(tmp_path / "k1.json", "FoundAD", "dinov3", {0: {"bottle": 0.9}}, "mvtec@1-shot")
    write_run(tmp_path / "k2.json", "FoundAD", "dinov3", {0: {"bottle": 0.95}}, "mvtec@2-shot")
    for path, k in ((tmp_path / "k1.json", 1), (tmp_path / "k2.json", 2)):  # legs are named without the shots
        data = json.loads(path.read_text())
        data["records"][0]["protocol"] = "mvtec"
        assert data["protocol"] == f"mvtec@{k}-shot"
        path.write_text(json.dumps(data))
    df = load_results([tmp_path])
    assert sorted(df["protocol"]) == ["mvtec@1-shot", "mvtec@2-shot"]
    text = render(pd.concat([df, load_reported()], ignore_index=True), "md", metrics=["image_auroc"])
    rows = md_table(text, "mvtec@1-shot - image_auroc")
    assert rows[0][:3] == ["Category", "FoundAD", "FoundAD (DINOv3) (reported)"]
    assert rows[-1][:3] == ["Mean", "90.0", "**96.1**"]


def test_bench_documents_render_like_files() -> None:
    keys = {"method": "spg", "backbone": "b", "device": "cpu", "dtype": "float32", "batch_size": 1}
    row = {**keys, "component": "method", "images_per_s": 2.0, "p50_ms": 1.0, "p95_ms": 2.0, "peak_mem_mb": 3.0}
    rows = list(csv.reader(render_bench([{"schema": "zsad-bench/bench/v1", "rows": [row]}], "csv").splitlines()))
    assert rows[1] == ["spg", "b", "float32", "1", "method", "cpu", "2.0", "1.0", "2.0", "3.0", ""]
    with pytest.raises(ZsadError, match="benchmark document 0: benchmark row 0 lacks p95_ms"):
        render_bench([{"rows": [{k: v for k, v in row.items() if k != "p95_ms"}]}])


def test_reader_closing_the_pipe_ends_the_command_quietly(tmp_path: Path) -> None:
    """``zsad-bench table ... | head``: no traceback, nothing on stderr, the shell's SIGPIPE status."""
    path = write_run(
        tmp_path / "wide.json", "Wide", "b", {111: {f"category{i:04d}": 0.5 for i in range(4000)}}, "synthetic"
    )  # a table of ~110 KB, more than a pipe holds (64 KiB): the command is still writing when the reader goes
    # Unbuffered (PYTHONUNBUFFERED), the one big print is one write() the pipe takes in part, without an error.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    cmd = [sys.executable, "-m", "zsad_bench.cli.main", "table", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert os.read(proc.stdout.fileno(), 10) == b"**MVTec AD"
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert (proc.returncode, err.decode()) == (141, "")


def test_broken_pipe_that_is_not_stdout_stays_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from zsad_bench.cli.main import main

    def fail(args: argparse.Namespace) -> int:
        raise BrokenPipeError("a worker's pipe")

    monkeypatch.setattr(table_cli, "run", fail)
    with pytest.raises(BrokenPipeError, match="a worker's pipe"):
        main(["table", "results.json"])


def test_a_warning_is_one_line_and_debug_keeps_pythons() -> None:
    """A warning raised inside a command prints as ``zsad-bench: warning: ...`` on one line, like errors
    (a subprocess: pytest records warnings instead of printing them)."""
    script = (
        "import sys, warnings\n"
        "import zsad_bench.cli.listing as listing\n"
        "from zsad_bench.cli.main import main\n"
        "def warns(args):\n"
        "    warnings.warn('cap: all map values are equal;\\n  aupro has no thresholds', UserWarning)\n"
        "    return 0\n"
        "listing._list = warns\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    plain = subprocess.run([sys.executable, "-c", script, "list", "methods"], capture_output=True, text=True)
    assert plain.returncode == 0
    assert plain.stderr == "zsad-bench: warning: cap: all map values are equal; aupro has no thresholds\n"
    debug = subprocess.run([sys.executable, "-c", script, "list", "methods", "--debug"], capture_output=True, text=True)
    assert debug.returncode == 0 and "UserWarning: cap: all map values are equal;" in debug.stderr
