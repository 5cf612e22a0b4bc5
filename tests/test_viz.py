"""Figures and reports (zsad_bench.viz): contents checked against independent references (sklearn, scipy,
hand-computed cases), not only that files exist."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

from zsad_bench.errors import ZsadError
from zsad_bench.viz import plots
from zsad_bench.viz.maps import MapWriter, estimate_bytes, has_maps, maps_dir, read_maps
from zsad_bench.viz.report import build_report
from zsad_bench.viz.runs import load_runs
from zsad_bench.viz.show import CONTOUR_RGB, choose, f1_threshold, overlay, show_grid

SIZE = 24
CATEGORIES = ("cat_a", "cat_b")
LEG = "synthetic:toy-leg"


def _blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random map: blurred noise."""
    return ndimage.gaussian_filter(rng.random((size, size)), 2.0)


def write_run(
    folder: Path,
    name: str,
    label: str = "MethodA",
    seed: int = 0,
    n: int = 10,
    save_maps: bool = True,
    learning_type: str = "zero-shot",
    method: str = "toy",
    method_config: dict | None = None,
    shots: int | None = None,
    leg: str = LEG,
    categories: tuple[str, ...] = CATEGORIES,
    backbone: str = "effnet-lite0",
    image_size: int = 224,
) -> Path:
    """A v2-shaped results file written by hand: images on disk, per-image records, metrics from sklearn,
    and (optionally) saved maps with masks through MapWriter."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    writer = MapWriter.open(path, SIZE, n * len(categories), log=None) if save_maps else None
    images, records = [], []
    for cat in categories:
        paths, maps, masks, labels, scores = [], [], [], [], []
        for i in range(n):
            label_i = int(i % 2 == 1)
            img_path = folder / "img" / cat / f"{i:03d}.png"
            img_path.parent.mkdir(parents=True, exist_ok=True)
            if not img_path.exists():
                Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(img_path)
            m = _blob(rng, SIZE)
            g = np.zeros((SIZE, SIZE), bool)
            if label_i:
                y, x = rng.integers(3, SIZE - 9, size=2)
                g[y : y + 6, x : x + 5] = True
                m = m + 0.15 * g * rng.random()
            paths.append(str(img_path))
            maps.append(m)
            masks.append(g)
            labels.append(label_i)
            scores.append(float(m.max()))
        for p, lab, s in zip(paths, labels, scores, strict=True):
            images.append(
                dict(
                    seed=seed,
                    leg=leg,
                    target="toyset",
                    category=cat,
                    path=p,
                    defect="hole" if lab else "good",
                    label=lab,
                    score=s,
                )
            )
        metrics = {
            "image_auroc": roc_auc_score(labels, scores),
            "pixel_auroc": roc_auc_score(np.ravel(masks), np.ravel(maps)),
        }
        records.append(
            dict(seed=seed, target="toyset", category=cat, n_images=n, metrics=metrics, seconds=0.1, protocol=leg)
        )
        if writer:
            writer.add(seed, leg, cat, paths[:4], np.stack(maps[:4]), np.stack(masks[:4]))
            writer.add(seed, leg, cat, paths[4:], np.stack(maps[4:]), np.stack(masks[4:]))
            writer.close_category(seed, leg, cat)
    data = {
        "schema": "zsad-bench/results/v2",
        "kind": "eval",
        "run_id": name,
        "method": method,
        "method_label": label,
        "backbone": backbone,
        "protocol": leg,
        "aux": [],
        "targets": ["toyset"],
        "config": {
            "method": method_config or {},
            "run": {
                "shots": shots,
                "image_size": image_size,
                "legs": [{"name": leg, "aux": [], "targets": ["toyset"]}],
            },
        },
        "seeds": [seed],
        "learning_type": learning_type,
        "metric_variants": {},
        "versions": {"torch": "x"},
        "git_commit": "abc123def",
        "device": "cpu:test",
        "created": "2026-01-01T00:00:00+00:00",
        "records": records,
        "images": images,
        "fits": [],
        "timings": {"total_s": 1.5},
        "complete": True,
    }
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------------------ saved maps


def test_map_writer_round_trip_estimate_and_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    maps = rng.random((5, 32, 32)).astype(np.float32)
    masks = rng.random((5, 32, 32)) > 0.7
    lines: list[str] = []
    w = MapWriter.open(tmp_path / "run.json", 32, n_images=1725, log=lines.append)
    assert len(lines) == 1 and "1725 anomaly maps at 32x32" in lines[0]
    assert estimate_bytes(1725, 448) == int(1725 * 448 * 448 * 2 / 1.3)  # the "~0.7 GB raw" case
    assert "MB" in lines[0] and str(maps_dir(tmp_path / "run.json")) in lines[0]
    w.add(111, "a:x-to-y", "cap", ["p0", "p1"], maps[:2], masks[:2])
    w.add(111, "a:x-to-y", "cap", ["p2", "p3", "p4"], maps[2:], masks[2:])
    assert not has_maps(tmp_path / "run.json"), "nothing is written before the category is complete"
    f = w.close_category(111, "a:x-to-y", "cap")
    assert f == tmp_path / "run.maps" / "seed=111" / "a_x-to-y" / "cap.npz"
    got = read_maps(tmp_path / "run.json", "cap")
    assert got.paths == ["p0", "p1", "p2", "p3", "p4"] and got.leg == "a:x-to-y"
    np.testing.assert_array_equal(got.maps, maps.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got.masks, masks)
    np.testing.assert_array_equal(got.select(["p3", "p0"]).maps, got.maps[[3, 0]])
    # resizing to a smaller stored size keeps a constant map constant and a mask's block structure
    w2 = MapWriter.open(tmp_path / "r2.json", 16, 1, log=None)
    block = np.zeros((1, 32, 32), bool)
    block[0, :16] = True
    w2.add(0, "leg", "c", ["q"], np.full((1, 32, 32), 0.25), block)
    w2.close_category(0, "leg", "c")
    small = read_maps(tmp_path / "r2.json", "c")
    assert small.maps.shape == (1, 16, 16) and np.all(small.maps == 0.25)
    assert small.masks[0, :8].all() and not small.masks[0, 8:].any()
    with pytest.raises(ZsadError, match="no saved maps for category 'nope'"):
        read_maps(tmp_path / "run.json", "nope")
    with pytest.raises(ZsadError, match="--save-maps 4: map size must be between 16 and 1024"):
        MapWriter.open(tmp_path / "x.json", 4, 1, log=None)


# ------------------------------------------------------------------------------------------ show


def test_f1_threshold_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    maps = np.round(rng.random((4, 16, 16)), 2)  # ties on purpose
    masks = rng.random((4, 16, 16)) > 0.8
    t, f1 = f1_threshold(maps, masks)
    p, r, th = precision_recall_curve(masks.ravel(), maps.ravel())
    f = 2 * p[:-1] * r[:-1] / np.maximum(p[:-1] + r[:-1], 1e-12)
    assert f1 == pytest.approx(f.max(), abs=1e-12)
    assert t == pytest.approx(th[np.argmax(f)])
    # hand case: scores 0.9 (pos) 0.8 (neg) 0.7 (pos) 0.1 (neg): t=0.9 -> F1 2/3; t=0.7 -> 2*2/(2*2+1+0)=0.8
    t2, f2 = f1_threshold(np.array([[0.9, 0.8, 0.7, 0.1]]), np.array([[True, False, True, False]]))
    assert (t2, f2) == (pytest.approx(0.7), pytest.approx(0.8))


def test_choose_worst_best_random() -> None:
    items = [("n_low", 0, 0.1), ("n_high", 0, 0.9), ("a_low", 1, 0.2), ("a_high", 1, 0.95), ("n_mid", 0, 0.5)]
    assert choose(items, 2, "worst") == ["n_high", "a_low"]
    assert choose(items, 2, "best") == ["n_low", "a_high"]
    assert choose(items, 3, "random") == choose(items, 3, "random") and len(set(choose(items, 3, "random"))) == 3


def test_overlay_contour_lies_on_f1_threshold_boundary(tmp_path: Path) -> None:
    path = write_run(tmp_path, "a")
    run = load_runs([path])[0]
    saved = read_maps(path, "cat_a")
    lo, hi = saved.maps.min(), saved.maps.max()
    scaled = (saved.maps - lo) / (hi - lo)
    # the F1-optimal threshold, independently: sklearn's precision-recall curve over the category's pixels
    p, r, th = precision_recall_curve(saved.masks.ravel(), scaled.ravel())
    t_ref = th[np.argmax(2 * p[:-1] * r[:-1] / np.maximum(p[:-1] + r[:-1], 1e-12))]
    for i in range(len(saved.paths)):
        img = np.asarray(Image.open(saved.paths[i]).convert("RGB"))
        rgb, _ = overlay(img, scaled[i], f1_threshold(scaled, saved.masks)[0])
        region = scaled[i] >= t_ref
        edge = region & ~ndimage.binary_erosion(region, border_value=0)  # 4-connected inner boundary
        painted = np.all(rgb == CONTOUR_RGB, axis=-1)
        np.testing.assert_array_equal(painted, edge)
    out, picked = show_grid([run, run], "cat_a", tmp_path / "grid.png", n=3, mode="worst")
    worst = choose([(x["path"], x["label"], x["score"]) for x in run.images_of("cat_a")], 3, "worst")
    assert picked == worst
    png = np.asarray(Image.open(out).convert("RGB"))
    assert np.all(png == CONTOUR_RGB, axis=-1).sum() > 20, "the grid shows the contour"
    assert png.std() > 20


def test_show_without_maps_of_a_few_shot_run_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_run(tmp_path, "fs", save_maps=False, learning_type="few-shot", shots=1)
    assert _main(["show", str(path), "--category", "cat_a"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "few-shot run without saved maps" in err and "--save-maps" in err
    assert _main(["show", str(write_run(tmp_path, "b")), "--category", "nope"]) == 2
    assert "no category 'nope'; it has cat_a, cat_b" in capsys.readouterr().err


def _main(argv: list[str]) -> int:
    """The CLI with the viz commands registered (main.py's COMMAND_MODULES gains them at integration)."""
    import zsad_bench.cli.main as cli

    mods = ("zsad_bench.cli.show", "zsad_bench.cli.plot", "zsad_bench.cli.report")
    old = cli.COMMAND_MODULES
    cli.COMMAND_MODULES = tuple(dict.fromkeys((*old, *mods)))
    try:
        return cli.main(argv)
    finally:
        cli.COMMAND_MODULES = old


# ------------------------------------------------------------------------------------------ plots


def test_area_under_plotted_roc_equals_recorded_auroc(tmp_path: Path) -> None:
    paths = [write_run(tmp_path, "a", "MethodA", seed=0), write_run(tmp_path, "b", "MethodB", seed=1)]
    runs = load_runs(paths)
    fig = plots.curve_figure(runs, "roc")
    checked = 0
    for ax in fig.figure.axes:
        cat = ax.get_title()
        for line in ax.get_lines():
            run = next((r for r in runs if r.label == line.get_label()), None)
            if run is None:
                continue  # the chance diagonal
            x, y = line.get_data()
            assert auc(x, y) == pytest.approx(run.metric(cat, "image_auroc"), abs=1e-12)
            checked += 1
    assert checked == 4
    # a hand case: scores 0.1 0.4 | 0.35 0.8 (neg | pos): 3 of 4 pairs ordered -> AUROC 0.75
    x, y = plots.image_curve(
        [{"label": lab, "score": s} for lab, s in ((0, 0.1), (0, 0.4), (1, 0.35), (1, 0.8))], "roc"
    )
    assert auc(x, y) == pytest.approx(0.75)
    colours = {line.get_label(): line.get_color() for ax in fig.figure.axes for line in ax.get_lines()}
    hist = plots.histogram_figures(runs)
    assert [h.name for h in hist] == ["hist_MethodA", "hist_MethodB"]
    bars = plots.bar_figures(runs)[0].figure.axes[0]
    for patch_group, run in zip(bars.containers, sorted(runs, key=lambda r: r.label), strict=True):
        assert patch_group.patches[0].get_facecolor()[:3] == pytest.approx(
            tuple(int(colours[run.label][i : i + 2], 16) / 255 for i in (1, 3, 5))
        ), "one colour per run in every figure"
        assert [p.get_height() for p in patch_group.patches] == pytest.approx(
            [100 * run.metric(c, "image_auroc") for c in CATEGORIES]
        )
    plots.close([fig, *hist])


def test_pro_curve_matches_direct_per_region_overlap_and_aupro() -> None:
    from zsad_bench.metrics.functional import aupro

    rng = np.random.default_rng(5)
    maps = np.stack([_blob(rng, 32) for _ in range(4)])
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 4:10, 4:12] = True
    masks[0, 20:26, 20:30] = True  # two regions in one image
    masks[2, 10:20, 5:9] = True
    maps = maps + 0.05 * masks
    fpr, pro = plots.pro_curve(maps, masks, steps=1000)
    neg = maps[~masks]
    for i in (100, 500, 1000):
        t_fpr = fpr[i]
        t = np.sort(neg)[::-1][max(round(t_fpr * neg.size) - 1, 0)]  # threshold reaching that FPR
        regions = [(0, ndimage.label(masks[0])[0] == k) for k in (1, 2)] + [(2, masks[2])]
        direct = np.mean([(maps[j][reg] >= t).mean() for j, reg in regions])
        assert (neg >= t).mean() == pytest.approx(t_fpr)
        assert pro[i] == pytest.approx(direct)
    assert auc(fpr, pro) / 0.3 == pytest.approx(aupro(maps, masks, fpr_limit=0.3), abs=2e-3)


def test_bars_mark_reported_values(tmp_path: Path) -> None:
    from zsad_bench.tables import load_reported

    rep = load_reported()
    rows = rep[(rep.table == "per_category") & (rep.metric == "image_auroc") & (rep.category == "bottle")]
    row = rows[rows.method == "AnomalyCLIP"].iloc[0]
    spg = rows[(rows.method == "SPG (DINOv3)") & (rows.protocol == row.protocol)].iloc[0]
    kw = dict(leg=row.protocol, categories=("bottle",), save_maps=False)
    runs = load_runs(
        [write_run(tmp_path, "r", label="AnomalyCLIP", **kw), write_run(tmp_path, "s", "SPG", backbone="dinov3", **kw)]
    )
    fig = plots.bar_figures(runs, metrics=("image_auroc",))[0]
    marks = sorted(tuple(c.get_offsets()[0]) for c in fig.figure.axes[0].collections)
    xs = [c.patches[0].get_x() + c.patches[0].get_width() / 2 for c in fig.figure.axes[0].containers]
    assert np.ravel(marks) == pytest.approx([xs[0], 100 * row.value, xs[1], 100 * spg.value])
    legend = sorted(t.get_text() for t in fig.figure.axes[0].get_legend().get_texts())
    assert legend == ["AnomalyCLIP", "SPG", "reported (paper)"]  # the markers' entry once
    plots.close([fig])


def test_fewshot_and_ablation_plots(tmp_path: Path) -> None:
    fs = [write_run(tmp_path / "fs", f"k{k}", "FS", seed=k, shots=k, method="fs", save_maps=False) for k in (1, 2, 4)]
    runs = load_runs(fs)
    fig = plots.fewshot_figure(runs, metrics=("image_auroc",))
    (line,) = fig.figure.axes[0].get_lines()
    xs, ys = line.get_data()
    assert list(xs) == [1, 2, 4]
    by_k = {r.config["run"]["shots"]: r for r in runs}
    expect = [100 * np.mean([by_k[k].metric(c, "image_auroc") for c in CATEGORIES]) for k in (1, 2, 4)]
    assert list(ys) == pytest.approx(expect)
    grid = [
        write_run(
            tmp_path / "abl",
            f"w{w}k{k}",
            "SPG",
            seed=10 * w + k,
            method="spg",
            method_config={"sae_width": w, "sae_k": k, "tau": 0.07},
            save_maps=False,
        )
        for w in (64, 128)
        for k in (8, 16, 32)
    ]
    runs = load_runs(grid)
    assert len({r.label for r in runs}) == 6 and "sae_k=8" in runs[0].label
    (heat,) = plots.ablation_figures(runs)
    assert heat.name == "ablation_spg_sae_k_x_sae_width"
    arr = heat.figure.axes[0].images[0].get_array()
    for r in runs:
        cfg = r.config["method"]
        i, j = [8, 16, 32].index(cfg["sae_k"]), [64, 128].index(cfg["sae_width"])
        assert arr[i, j] == pytest.approx(100 * np.mean([r.metric(c, "image_auroc") for c in CATEGORIES]))
    plots.close([fig, heat])


# ------------------------------------------------------------------------------------------ report


def test_report_has_every_category_figure_and_decodable_images(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_run(sweep, "a", "MethodA", seed=0)
    write_run(sweep, "b", "MethodB", seed=1, categories=("cat_a", "cat_c"), save_maps=False)
    out, names = build_report([sweep], tmp_path / "report.html", overlays=2)
    doc = out.read_text()
    for cat in ("cat_a", "cat_b", "cat_c"):
        assert re.search(rf"<tr><td>{cat}</td>", doc), cat
    listed = re.findall(r'<li><a href="#fig-([^"]+)">', doc)
    bodies = re.findall(r'<figure id="fig-([^"]+)"', doc)
    assert listed == bodies == names and len(names) >= 8
    assert {"image_roc", "image_pr", "pixel_roc", "pro", "overlay_cat_a", "overlay_cat_b"} <= set(names)
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', doc)
    assert len(uris) == len(names)
    for uri in uris:
        img = Image.open(io.BytesIO(base64.b64decode(uri, validate=True)))
        img.verify()
        assert img.format == "PNG"
    assert not re.search(r'(src|href)="(?!data:|#)', doc), "no external resource: the file is self-contained"
    assert "abc123def" in doc and "cpu:test" in doc and "total_s" in doc


def test_cli_plot_and_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_run(tmp_path, "a", save_maps=False)
    assert _main(["plot", str(path), "-o", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "image_roc.pdf").read_bytes().startswith(b"%PDF")
    assert Image.open(tmp_path / "figs" / "image_roc.png").size[0] > 300
    assert _main(["report", str(path), "-o", str(tmp_path / "r.txt")]) == 2
    assert "use a .html name" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "other"}')
    assert _main(["plot", str(bad)]) == 2
    assert "not a zsad-bench results file" in capsys.readouterr().err
    assert not math.isnan(load_runs([path])[0].metric("cat_a", "image_auroc"))


@pytest.mark.parametrize("command", ["plot", "report", "table"])
def test_null_image_score_is_one_line_naming_the_record(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: str
) -> None:
    """A NaN image score (stored as null) was a TypeError traceback in every image curve."""
    path = write_run(tmp_path, "a", save_maps=False)
    data = json.loads(path.read_text())
    data["images"][3]["score"] = None
    path.write_text(json.dumps(data))
    out = tmp_path / {"plot": "figs", "report": "r.html", "table": "t.md"}[command]
    assert _main([command, str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"zsad-bench: error: {path}: images[3] has no finite score (null); re-run or remove the file"


# ------------------------------------------------------------------------------------------ re-predicted maps


def _folder_dataset(root: Path, category: str, seed: int, n: int = 4) -> str:
    """A tiny MVTec-layout dataset: bright squares on noise are the defects."""
    rng = np.random.default_rng(seed)
    for split, kind in (("train", "good"), ("test", "good"), ("test", "hole")):
        d = root / category / split / kind
        d.mkdir(parents=True)
        for i in range(n):
            img = (rng.random((48, 48, 3)) * 80).astype(np.uint8)
            if kind == "hole":
                mask = np.zeros((48, 48), np.uint8)
                y, x = rng.integers(4, 28, size=2)
                mask[y : y + 14, x : x + 14] = 255
                img[mask > 0] = 255
                gt = root / category / "ground_truth" / kind
                gt.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(gt / f"{i:03d}_mask.png")
            Image.fromarray(img).save(d / f"{i:03d}.png")
    return f"folder:{root}"


def test_zero_shot_run_without_maps_is_re_predicted_from_its_checkpoint(tmp_path: Path) -> None:
    from zsad_bench.runner import RunSpec, run_experiment

    aux = _folder_dataset(tmp_path / "aux", "tex", 0)
    target = _folder_dataset(tmp_path / "tgt", "obj", 1)
    _, path = run_experiment(
        RunSpec("toy-zeroshot", protocol=None, aux=[aux], targets=[target], image_size=64, batch_size=4,
                out=tmp_path / "run.json", progress=False)
    )  # fmt: skip
    run = load_runs([path])[0]
    assert not has_maps(path) and len(run.images) == 8  # per-image scores recorded, maps not saved
    out, picked = show_grid([run], "obj", tmp_path / "grid.png", n=3, mode="best")
    from zsad_bench.viz.show import category_maps

    cm = category_maps(run, "obj")
    assert cm.origin == "re-predicted from checkpoint" and len(cm.saved.paths) == 8
    labels = [int(m.any()) for m in cm.saved.masks]
    assert labels == [0] * 4 + [1] * 4
    # the re-predicted scores reproduce the run's own recorded image AUROC
    assert roc_auc_score(labels, [cm.scores[p] for p in cm.saved.paths]) == pytest.approx(
        run.metric("obj", "image_auroc")
    )
    assert out.exists() and len(picked) == 3


def test_several_one_dimensional_sweeps_in_one_folder(tmp_path: Path) -> None:
    """tau, guide_topk and backbone sweeps around one base config: one plot each; the image size that comes with
    a backbone is not a separate axis."""
    base = {"tau": 0.07, "guide_topk": None}
    variants = [({}, "effnet-lite0", 224), ({"tau": 0.05}, "effnet-lite0", 224), ({"tau": 0.1}, "effnet-lite0", 224)]
    variants += [({"guide_topk": 32}, "effnet-lite0", 224), ({"guide_topk": 64}, "effnet-lite0", 224)]
    variants += [({}, "dinov2", 448)]
    paths = [
        write_run(tmp_path, f"v{i}", "SPG", seed=i, method="spg", method_config={**base, **cfg}, backbone=bb,
                  image_size=size, save_maps=False)
        for i, (cfg, bb, size) in enumerate(variants)
    ]  # fmt: skip
    runs = load_runs(paths)
    figs = {f.name: f for f in plots.ablation_figures(runs)}
    assert set(figs) == {"ablation_spg_tau", "ablation_spg_guide_topk", "ablation_spg_backbone"}
    mean = {r.path.stem: 100 * np.mean([r.metric(c, "image_auroc") for c in CATEGORIES]) for r in runs}
    (line,) = figs["ablation_spg_tau"].figure.axes[0].get_lines()
    assert list(line.get_xdata()) == [0.05, 0.07, 0.1]
    assert list(line.get_ydata()) == pytest.approx([mean["v1"], mean["v0"], mean["v2"]])
    bars = figs["ablation_spg_backbone"].figure.axes[0]
    assert [t.get_text() for t in bars.get_xticklabels()] == ["dinov2", "effnet-lite0"]
    assert [p.get_height() for p in bars.patches] == pytest.approx([mean["v5"], mean["v0"]])
    plots.close(list(figs.values()))


# ------------------------------------------------------------------------------------------ multi-seed runs


def write_two_seed_run(folder: Path, name: str = "two", label: str = "MethodA") -> Path:
    """One results file with seeds 0 and 1 (as `run --seed 0 1` writes it) and the saved maps of both. Image
    scores are set by hand: seed 0's put every anomalous image above every good one (AUROC 1), seed 1's the
    reverse (AUROC 0); the maps of the two seeds are different random blobs."""
    parts = [write_run(folder, f"{name}_s{seed}", label, seed=seed) for seed in (0, 1)]
    data = json.loads(parts[0].read_text())
    data["seeds"], data["records"], data["images"] = [0, 1], [], []
    path = folder / f"{name}.json"
    for seed, part in enumerate(parts):
        d = json.loads(part.read_text())
        for im in d["images"]:
            high = im["label"] if seed == 0 else 1 - im["label"]
            im["score"] = 0.2 + 0.6 * high + 0.01 * int(Path(im["path"]).stem)
        for rec in d["records"]:
            rec["metrics"]["image_auroc"] = 1.0 - seed
        data["records"] += d["records"]
        data["images"] += d["images"]
        shutil.move(maps_dir(part) / f"seed={seed}", maps_dir(path) / f"seed={seed}")
        shutil.rmtree(maps_dir(part))
        part.unlink()
    path.write_text(json.dumps(data))
    return path


def _seed_images(path: Path, seed: int, category: str = "cat_a") -> tuple[list[int], list[float]]:
    rows = [x for x in json.loads(path.read_text())["images"] if x["seed"] == seed and x["category"] == category]
    return [x["label"] for x in rows], [x["score"] for x in rows]


def test_plot_draws_the_chosen_seed_and_says_which(tmp_path: Path) -> None:
    path = write_two_seed_run(tmp_path)
    runs = load_runs([path])
    assert runs[0].seeds == [0, 1]
    for seed, drawn, expect in ((None, 0, 1.0), (0, 0, 1.0), (1, 1, 0.0)):
        fig = plots.curve_figure(runs, "roc", seed)
        ax = fig.figure.axes[0]
        assert ax.get_title() == "cat_a"
        (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "MethodA"]
        labels, scores = _seed_images(path, drawn)
        assert roc_auc_score(labels, scores) == expect  # the hand-designed scores
        fpr, tpr, _ = roc_curve(labels, scores)
        np.testing.assert_allclose(line.get_xdata(), fpr)
        np.testing.assert_allclose(line.get_ydata(), tpr)
        assert auc(*line.get_data()) == pytest.approx(expect)
        assert fig.title == fig.figure._suptitle.get_text() == f"Image ROC curves (seed {drawn} of 0, 1)"
        assert f"seed {drawn} of 0, 1" in fig.caption and "first seed" not in fig.caption
        plots.close([fig])
    # histograms follow the seed: seed 0 scores good images 0.20-0.28 (bins left of 0.3), seed 1 0.80-0.88
    for seed, good_at in ((0, lambda x: x < 0.3), (1, lambda x: x > 0.7)):
        (hist,) = plots.histogram_figures(runs, seed)
        assert hist.title == f"Score histograms, MethodA (seed {seed} of 0, 1)"
        good = hist.figure.axes[0].containers[0]
        assert sum(p.get_height() for p in good if good_at(p.get_x())) == 5
        plots.close([hist])


def test_seed_not_in_a_run_is_a_one_line_error_naming_the_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_two_seed_run(tmp_path)
    with pytest.raises(ZsadError, match=r"no seed 5; its seeds are 0, 1$"):
        plots.curve_figure(load_runs([path]), "roc", 5)
    for cmd in (["plot"], ["show", "--category", "cat_a"]):
        assert _main([*cmd, str(path), "--seed", "5"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(path) in err and "its seeds are 0, 1" in err
    other = write_run(tmp_path / "b", "b", "MethodB", seed=0)  # compared runs with different seed sets
    assert _main(["plot", str(path), str(other), "--seed", "1", "-o", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"zsad-bench: error: {other}: --seed 1") and "its seeds are 0" in err
    assert _main(["plot", str(path), str(other), "--seed", "0", "-o", str(tmp_path / "f")]) == 0
    with pytest.raises(SystemExit):
        _main(["plot", str(path), "--seed", "last"])
    assert "neither a seed (an integer) nor 'all'" in capsys.readouterr().err


def test_plot_all_seeds_thin_lines_and_mean_std_in_the_legend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_two_seed_run(tmp_path)
    runs = load_runs([path])
    colour = plots.colors(runs)["MethodA"][0]
    # ROC: AUROC 1 (seed 0) and 0 (seed 1): mean 0.5, sample std sqrt(((1 - .5)^2 + (0 - .5)^2) / 1) = 0.7071
    # PR: seed 1 ranks the 5 anomalous images of 10 last: AP = (1/6 + 2/7 + 3/8 + 4/9 + 5/10) / 5
    ap1 = (1 / 6 + 2 / 7 + 3 / 8 + 4 / 9 + 5 / 10) / 5
    expect = {"roc": ("AUROC", [1.0, 0.0]), "pr": ("AP", [1.0, ap1])}
    for kind, (name, values) in expect.items():
        fig = plots.curve_figure(runs, kind, "all")
        mean, std = (values[0] + values[1]) / 2, abs(values[0] - values[1]) / math.sqrt(2)
        assert fig.title.endswith("(every seed)")
        for ax, cat in zip(fig.figure.axes, CATEGORIES, strict=True):
            lines = [ln for ln in ax.get_lines() if ln.get_color() == colour]
            assert len(lines) == 2 and all(ln.get_linewidth() < 1 for ln in lines)
            legend = [t.get_text() for t in ax.get_legend().get_texts()]
            assert legend == [f"MethodA ({name} {mean:.2f} ± {std:.2f})"], cat
            if kind == "roc":
                assert sorted(auc(*ln.get_data()) for ln in lines) == pytest.approx([0.0, 1.0])
        plots.close([fig])
    assert f"{0.5:.2f} ± {math.sqrt(0.5):.2f}" == "0.50 ± 0.71"
    # the CLI: --seed all reaches the curves; histograms keep one seed (the first) and say so
    drawn: list = []
    close = plots.close
    monkeypatch.setattr(plots, "close", lambda figs: (drawn.extend(figs), close(figs)))
    assert _main(["plot", str(path), "--seed", "all", "-o", str(tmp_path / "figs")]) == 0
    titles = {f.name: f.title for f in drawn}
    assert titles["image_roc"] == "Image ROC curves (every seed)"
    assert titles["hist_MethodA"] == "Score histograms, MethodA (seed 0 of 0, 1)"
    assert titles["pixel_roc"] == "Pixel ROC curves (seed 0 of 0, 1)"
    drawn.clear()
    assert _main(["plot", str(path), "--seed", "1", "-o", str(tmp_path / "figs")]) == 0
    titles = {f.name: f.title for f in drawn}
    assert titles["image_pr"] == "Image precision-recall curves (seed 1 of 0, 1)"
    assert titles["pro"] == "PRO curves (FPR up to 0.3) (seed 1 of 0, 1)"


def test_show_seed_draws_that_seeds_maps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import matplotlib.pyplot as plt

    path = write_two_seed_run(tmp_path)
    figures: list = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))  # the figure, once drawn
    scaled = {}
    for seed in (0, 1):
        saved = read_maps(path, "cat_a", seed=seed)
        scaled[seed] = {
            p: (m - saved.maps.min()) / np.ptp(saved.maps) for p, m in zip(saved.paths, saved.maps, strict=True)
        }
    for args, seed in (([], 0), (["--seed", "1"], 1)):
        out = tmp_path / f"grid{seed}.png"
        assert _main(["show", str(path), "-c", "cat_a", "--n", "3", "-o", str(out), *args]) == 0
        assert capsys.readouterr().out.strip() == f"3 images of cat_a (worst, seed {seed} of 0, 1) from 1 run(s): {out}"
        fig = figures.pop()
        assert f"seed {seed} of 0, 1" in fig._suptitle.get_text()
        labels, scores = _seed_images(path, seed)
        paths = [x["path"] for x in json.loads(path.read_text())["images"] if x["seed"] == seed][: len(labels)]
        picked = choose(list(zip(paths, labels, scores, strict=True)), 3, "worst")
        for i, p in enumerate(picked):
            panel = fig.axes[4 * i + 2].images[0].get_array()
            np.testing.assert_allclose(panel, scaled[seed][p], atol=1e-6)
            assert not np.allclose(panel, scaled[1 - seed][p], atol=1e-3)


def test_show_re_predicts_with_the_chosen_seeds_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zsad_bench.runner

    path = write_two_seed_run(tmp_path)
    shutil.rmtree(maps_dir(path))  # a zero-shot run without saved maps is re-predicted from its checkpoint

    def load_fitted(results: Path, seed: int, leg_index: int, device: str) -> None:
        raise ZsadError(f"load_fitted {results} seed={seed} leg={leg_index}")

    monkeypatch.setattr(zsad_bench.runner, "load_fitted", load_fitted)
    for seed in (0, 1):
        with pytest.raises(ZsadError, match=rf"load_fitted {re.escape(str(path))} seed={seed} leg=0$"):
            show_grid(load_runs([path]), "cat_b", tmp_path / "g.png", seed=seed)


def test_report_captions_name_the_seed_of_multi_seed_runs(tmp_path: Path) -> None:
    path = write_two_seed_run(tmp_path)
    out, names = build_report([path], tmp_path / "report.html", overlays=2)
    doc = out.read_text()
    captions = dict(re.findall(r'<figure id="fig-([^"]+)".*?<figcaption>(.*?)</figcaption>', doc))
    assert set(captions) == set(names) and "overlay_cat_a" in names
    for name in ("image_roc", "image_pr", "pixel_roc", "pro", "hist_MethodA", "overlay_cat_a", "overlay_cat_b"):
        assert "seed 0 of 0, 1" in captions[name], name


def test_report_seed_option_draws_that_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_two_seed_run(tmp_path)
    out = tmp_path / "r1.html"
    assert _main(["report", str(path), "-o", str(out), "--overlays", "2", "--seed", "1"]) == 0
    captions = dict(re.findall(r'<figure id="fig-([^"]+)".*?<figcaption>(.*?)</figcaption>', out.read_text()))
    for name in ("image_roc", "hist_MethodA", "overlay_cat_a"):
        assert "seed 1 of 0, 1" in captions[name], name
    assert _main(["report", str(path), "-o", str(tmp_path / "r5.html"), "--seed", "5"]) == 2
    assert capsys.readouterr().err == (
        f"zsad-bench: error: {path}: --seed 5: this run has no seed 5; its seeds are 0, 1\n"
    )
    assert not (tmp_path / "r5.html").exists()


def test_a_one_class_category_panel_says_why_it_has_no_curve(tmp_path: Path) -> None:
    import warnings

    path = write_run(tmp_path, "one")
    data = json.loads(path.read_text())
    for im in data["images"]:
        if im["category"] == "cat_a":
            im["label"], im["defect"] = 0, "good"
    path.write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = plots.curve_figure(load_runs([path]), "roc")
    assert fig is not None and not [w for w in caught if "legend" in str(w.message).lower()]
    panels = {ax.get_title(): ax for ax in fig.figure.axes if ax.get_title()}
    assert [t.get_text() for t in panels["cat_a"].texts] == ["one class of images only:\nno curve"]
    assert len(panels["cat_a"].get_lines()) == 1  # the chance diagonal only
    assert panels["cat_b"].get_legend() is not None and not panels["cat_b"].texts
    plots.close([fig])
