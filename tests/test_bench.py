"""``zsad-bench bench`` on CPU: backbone, method and total rows for each batch size, in a results file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zsad_bench.cli.main import main


def test_bench_prints_table_and_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--method", "toy-zeroshot", "--batch-sizes", "1", "2", "--warmup", "1", "--iters", "3"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "images_per_s" in printed or "images/s" in printed
    doc = json.loads(out.read_text())
    assert doc["schema"] == "zsad-bench/bench/v1" and doc["backbone"] == "effnet-lite0"
    combos = {(r["batch_size"], r["component"]) for r in doc["rows"]}
    assert combos == {(b, c) for b in (1, 2) for c in ("backbone", "method", "total")}
    for row in doc["rows"]:
        assert row["images_per_s"] > 0 and 0 < row["p50_ms"] <= row["p95_ms"]
    total = next(r for r in doc["rows"] if r["component"] == "total" and r["batch_size"] == 2)
    assert total["overhead_vs_backbone"] > -0.5
    assert main(["table", str(out), "--format", "md"]) == 0
    assert "toy-zeroshot" in capsys.readouterr().out
