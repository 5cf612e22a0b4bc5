"""Bootstrap intervals and the paired test against a direct seeded bootstrap (numpy draws + sklearn loop)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from tests.test_tables import run_cli  # the `zsad-bench table` parser, as the CLI builds it
from zsad_bench.errors import ZsadError
from zsad_bench.results import CategoryRecord, RunResult
from zsad_bench.tables import render, scan
from zsad_bench.tables.render import build, paired_tests

LEG = "visa-to-mvtec"
# category -> (n normal, n anomalous); "crate" has ties (scores rounded) to exercise average ranks
LAYOUT = {"bottle": (7, 5), "crate": (6, 9)}


def images_for(rng: np.random.Generator, shift: float, seed: int) -> list[dict]:
    out = []
    for category, (n0, n1) in LAYOUT.items():
        for label, n in ((0, n0), (1, n1)):
            scores = rng.normal(label * shift, 1.0, n)
            if category == "crate":
                scores = np.round(scores, 0)
            out += [
                {"seed": seed, "leg": LEG, "target": "mvtec:/data", "category": category,
                 "path": f"{category}/{label}/{i:03d}.png", "defect": "good" if label == 0 else "cut",
                 "label": label, "score": float(s)}
                for i, s in enumerate(scores)
            ]  # fmt: skip
    return out


def write_v2(path: Path, label: str, images: list[dict]) -> Path:
    """A schema-v2 results file written by hand: category metrics from the images, plus the images."""
    records = []
    for (seed, category), _ in sorted({((r["seed"], r["category"]), 0) for r in images}):
        mine = [r for r in images if r["seed"] == seed and r["category"] == category]
        y, s = [r["label"] for r in mine], [r["score"] for r in mine]
        metrics = {"image_auroc": roc_auc_score(y, s), "image_ap": average_precision_score(y, s)}
        records.append(CategoryRecord(seed, "mvtec:/data", category, len(mine), metrics, protocol=LEG))
    seeds = sorted({r["seed"] for r in images})
    run = RunResult(
        run_id=path.stem, method=label.lower(), method_label=label, backbone="dinov3", protocol=LEG, aux=[],
        targets=["mvtec:/data"], config={}, seeds=seeds, learning_type="zero-shot", metric_variants={},
        records=records, complete=True,
    )  # fmt: skip
    data = run.to_json()
    data["schema"] = "zsad-bench/results/v2"
    data["images"] = images
    path.write_text(json.dumps(data))
    return path


def draws(seed: int, n_boot: int) -> dict[tuple[str, int], np.ndarray]:
    """The documented draw order: categories sorted, label 0 then 1, integers(0, n, size=(B, n))."""
    rng = np.random.default_rng(seed)
    return {
        (c, lab): rng.integers(0, LAYOUT[c][lab], size=(n_boot, LAYOUT[c][lab]))
        for c in sorted(LAYOUT)
        for lab in (0, 1)
    }


def reference(images: list[dict], metric, seed: int, n_boot: int) -> dict[str, np.ndarray]:
    """Per category and mean (""), the replicate values computed one replicate at a time with sklearn."""
    idx = draws(seed, n_boot)
    seeds = sorted({r["seed"] for r in images})
    out: dict[str, np.ndarray] = {}
    for c in sorted(LAYOUT):
        per_seed = []
        for s in seeds:
            by_label = []
            for lab in (0, 1):
                mine = sorted((r for r in images if r["seed"] == s and r["category"] == c and r["label"] == lab),
                              key=lambda r: r["path"])  # fmt: skip
                by_label.append(np.array([r["score"] for r in mine]))
            vals = []
            for b in range(n_boot):
                neg, pos = by_label[0][idx[(c, 0)][b]], by_label[1][idx[(c, 1)][b]]
                y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
                vals.append(metric(y, np.r_[neg, pos]))
            per_seed.append(vals)
        out[c] = np.mean(per_seed, axis=0)
    out[""] = np.mean([out[c] for c in sorted(LAYOUT)], axis=0)
    return out


@pytest.mark.parametrize("seeds", [(0,), (0, 1)])
def test_intervals_equal_direct_stratified_bootstrap(tmp_path: Path, seeds: tuple[int, ...]) -> None:
    rng = np.random.default_rng(11)
    images = [r for s in seeds for r in images_for(rng, 1.2, s)]
    path = write_v2(tmp_path / "a.json", "SPG", images)
    found = scan([path])
    n_boot, ci_seed = 120, 3
    model = build(found.evals, ci=90, n_boot=n_boot, ci_seed=ci_seed, images=found.images)
    key = "mvtec:/data"
    auroc = reference(images, roc_auc_score, ci_seed, n_boot)
    for name, fn in (("image_auroc", roc_auc_score), ("image_ap", average_precision_score)):
        ref = auroc if name == "image_auroc" else reference(images, fn, ci_seed, n_boot)
        for category, values in ref.items():
            low, high = np.percentile(values, [5, 95])
            got = model.ci[(key, name, category, category == "", "SPG")]
            assert got == pytest.approx((low, high), abs=1e-12), (name, category)
    # the same intervals through the CLI, in the CSV (percent, 4 decimals) and in the Markdown cells
    out = tmp_path / "t.csv"
    argv = [str(path), "--ci", "90", "--bootstrap", str(n_boot), "--ci-seed", str(ci_seed), "--metric", "image_auroc"]
    assert run_cli(*argv, "--format", "csv", "--out", str(out)) == 0
    rows = list(csv.DictReader(out.read_text().splitlines()))
    mean_row = next(r for r in rows if r["metric"] == "image_auroc" and r["category"] == "mean")
    low, high = np.percentile(auroc[""], [5, 95])
    assert float(mean_row["ci_low"]) == pytest.approx(100 * low, abs=1e-4)
    assert float(mean_row["ci_high"]) == pytest.approx(100 * high, abs=1e-4)
    text = render(
        found.evals, "md", metrics=["image_auroc"], ci=90, n_boot=n_boot, ci_seed=ci_seed, images=found.images
    )
    assert f"[{100 * low:.1f}, {100 * high:.1f}]" in text.split("**visa-to-mvtec - image_auroc")[1].split("Mean")[1]


def test_paired_bootstrap_equals_direct_computation(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    a_images = images_for(rng, 1.5, 0)
    b_images = [{**r, "score": r["score"] + float(rng.normal(0, 0.8))} for r in a_images]  # same images, other scores
    a = write_v2(tmp_path / "a.json", "A", a_images)
    b = write_v2(tmp_path / "b.json", "B", b_images)
    n_boot, seed = 200, 9
    ra = reference(a_images, roc_auc_score, seed, n_boot)[""]
    rb = reference(b_images, roc_auc_score, seed, n_boot)[""]
    diff = ra - rb

    def observed(images: list[dict]) -> float:
        return float(np.mean([roc_auc_score(
            [r["label"] for r in images if r["category"] == c], [r["score"] for r in images if r["category"] == c]
        ) for c in sorted(LAYOUT)]))  # fmt: skip

    d = observed(a_images) - observed(b_images)
    p = (1 + np.sum(np.abs(diff - d) >= abs(d) - 1e-12)) / (n_boot + 1)  # ties within rounding count
    low, high = np.percentile(diff, [2.5, 97.5])
    found = scan([a, b])
    model = build(found.evals, images=found.images)
    [(_, result)] = paired_tests(model, found.images, 95, n_boot, seed)
    assert (result.a, result.b) == ("A", "B")
    assert result.difference == pytest.approx(d, abs=1e-12)
    assert (result.low, result.high) == pytest.approx((low, high), abs=1e-12)
    assert result.p_value == pytest.approx(p, abs=1e-12)
    assert result.n_images == sum(n0 + n1 for n0, n1 in LAYOUT.values()) and result.n_categories == 2
    out = tmp_path / "t.md"
    argv = [str(a), str(b), "--paired", "--bootstrap", str(n_boot), "--ci-seed", str(seed), "--out", str(out)]
    assert run_cli(*argv) == 0
    line = next(ln for ln in out.read_text().splitlines() if re.match(r"\| visa-to-mvtec\s+\| A ", ln))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3:6] == [f"{100 * d:+.1f}", f"[{100 * low:+.1f}, {100 * high:+.1f}]", f"{p:.3f}"]


def test_paired_refuses_different_images_and_v1_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a_images = images_for(rng, 1.0, 0)
    write_v2(tmp_path / "a.json", "A", a_images)
    write_v2(tmp_path / "b.json", "B", [{**r, "path": "other/" + r["path"]} for r in a_images])
    found = scan([tmp_path])
    with pytest.raises(ZsadError, match="A and B were scored on different images"):
        render(found.evals, "md", paired=True, n_boot=20, images=found.images)
    with pytest.raises(ZsadError, match="--paired prints a table of its own; use --format md or latex"):
        render(found.evals, "csv", paired=True, n_boot=20, images=found.images)
    v1 = tmp_path / "v1"
    v1.mkdir()
    data = json.loads((tmp_path / "a.json").read_text())
    data["schema"] = "zsad-bench/results/v1"
    del data["images"]
    (v1 / "a.json").write_text(json.dumps(data))
    with pytest.raises(ZsadError, match=r"--paired needs two runs .* per-image records"):
        run_cli(str(v1), "--paired")
    text = render(scan([v1]).evals, "md", ci=95, n_boot=20)
    assert "No interval for A: no per-image records" in text
    with pytest.raises(ZsadError, match="--ci 150: give a confidence level"):
        run_cli(str(v1), "--ci", "150")


def test_vectorised_auroc_and_ap_equal_sklearn() -> None:
    from zsad_bench.tables.bootstrap import _ap_rows, _auroc_rows

    rng = np.random.default_rng(0)
    neg = np.round(rng.normal(0, 1, (50, 13)), 1)  # many ties, within and across labels
    pos = np.round(rng.normal(0.7, 1, (50, 6)), 1)
    y = np.r_[np.zeros(13), np.ones(6)]
    want_auc = [roc_auc_score(y, np.r_[a, b]) for a, b in zip(neg, pos, strict=True)]
    want_ap = [average_precision_score(y, np.r_[a, b]) for a, b in zip(neg, pos, strict=True)]
    assert _auroc_rows(neg, pos) == pytest.approx(want_auc, abs=1e-12)
    assert _ap_rows(neg, pos) == pytest.approx(want_ap, abs=1e-12)
