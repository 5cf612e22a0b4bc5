"""``zsad-bench bench`` on CPU: backbone, method and total rows for each batch size, in a results file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zsad_bench.cli.main import main


def test_bench_prints_table_and_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--method", "toy-zeroshot", "--batch-sizes", "1", "2", "--warmup", "1", "--iters", "3"]
    argv += ["--extraction-images", "4"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "images_per_s" in printed or "images/s" in printed
    doc = json.loads(out.read_text())
    assert doc["schema"] == "zsad-bench/bench/v1" and doc["backbone"] == "effnet-lite0"
    combos = {(r["batch_size"], r["component"]) for r in doc["rows"]}
    components = ("upstream", "backbone", "method", "total", "extraction")
    assert combos == {(b, c) for b in (1, 2) for c in components}
    for row in doc["rows"]:
        assert row["images_per_s"] > 0 and 0 < row["p50_ms"] <= row["p95_ms"] and row["peak_mem_mb"] >= 0
    assert doc["fit"] is None  # no fit figure unless asked (and only for SPG)
    for bs in (1, 2):
        rows = {r["component"]: r for r in doc["rows"] if r["batch_size"] == bs}
        # overhead = total time / backbone time - 1 = backbone throughput / total throughput - 1
        expected = rows["backbone"]["images_per_s"] / rows["total"]["images_per_s"] - 1
        assert abs(rows["total"]["overhead_vs_backbone"] - expected) < 1e-9
    assert main(["table", str(out), "--format", "md"]) == 0
    table = capsys.readouterr().out
    totals = [line for line in table.splitlines() if "| total" in line]
    assert len(totals) == 2 and all("toy-zeroshot" in t and t.rstrip(" |").endswith("%") for t in totals)
