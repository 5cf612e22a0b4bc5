"""Figures from results files: image/pixel ROC, PR and PRO curves, per-category bars (reported values as
markers), score histograms, few-shot curves (metric vs k) and ablation plots (one config value varied: line or
bars; two: heat map).

All figures use the Okabe-Ito colour-blind-safe palette and the same colour for a run label in every figure
(colours are assigned over the sorted labels of all runs loaded together). Curves use scikit-learn's
``roc_curve``/``precision_recall_curve``; the PRO curve is written out (per-region overlap, no library has it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from zsad_bench.errors import ZsadError
from zsad_bench.viz.maps import has_maps, read_maps
from zsad_bench.viz.runs import Run, flat_config, pick_seeds, seed_note

# Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision deficiency.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
BAR_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "aupro")
ALL_SEEDS = "all"
Seed = int | Literal["all"] | None


@dataclass
class FigureOut:
    """A drawn figure with a file-safe ``name``, a ``title`` and a one-line ``caption``."""

    name: str
    title: str
    caption: str
    figure: Figure


def colors(runs: Sequence[Run]) -> dict[str, tuple[str, str]]:
    """``label -> (colour, marker)``; the palette repeats with a new marker after 8 labels."""
    labels = sorted({r.label for r in runs})
    return {lab: (OKABE_ITO[i % 8], MARKERS[(i // 8) % len(MARKERS)]) for i, lab in enumerate(labels)}


def _grid(n: int, width: float = 3.2) -> tuple[Figure, np.ndarray]:
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, width * rows + 0.4), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def _categories(runs: Sequence[Run]) -> list[str]:
    return list(dict.fromkeys(c for r in runs for c in r.categories()))


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def _titled(title: str, note: str) -> str:
    return f"{title} ({note})" if note else title


def _mean_std(values: Sequence[float]) -> str:
    """``0.50 ± 0.71``: mean and sample standard deviation (ddof=1, as the tables' seed spreads); the mean alone
    for one value."""
    if len(values) < 2:
        return f"{np.mean(values):.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def image_curve(records: Sequence[dict], kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of the image-level ``roc`` (FPR, TPR) or ``pr`` (recall, precision) curve of per-image records."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    labels = np.array([int(r["label"]) for r in records])
    scores = np.array([float(r["score"]) for r in records])
    if kind == "roc":
        fpr, tpr, _ = roc_curve(labels, scores)
        return fpr, tpr
    precision, recall, _ = precision_recall_curve(labels, scores)
    return recall, precision


def pro_curve(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3, steps: int = 300) -> tuple[np.ndarray, ...]:
    """``(fpr, pro)``: per-region overlap vs false-positive rate of the normal pixels, FPR in [0, ``fpr_limit``].

    PRO at threshold t = mean over connected ground-truth regions (8-connectivity, per image) of the fraction of
    the region's pixels with ``map >= t`` (Bergmann et al., MVTec AD, 2021). Thresholds are the normal pixels'
    quantiles at FPR = 0, ``fpr_limit``/steps, ...; both rates are exact at those thresholds.
    """
    from scipy import ndimage

    neg = np.sort(maps[~masks].ravel())
    regions = []
    for m, g in zip(maps, masks, strict=True):
        lab, n = ndimage.label(g, structure=np.ones((3, 3)))
        regions += [np.sort(m[lab == i]) for i in range(1, n + 1)]
    if not regions or neg.size == 0:
        raise ZsadError("PRO needs anomalous and normal pixels in the category")
    fprs = np.linspace(0.0, fpr_limit, steps + 1)
    k = np.clip(np.ceil((1.0 - fprs) * neg.size).astype(int), 0, neg.size - 1)
    thresholds = np.where(fprs == 0, np.nextafter(neg[-1], np.inf), neg[k])
    fpr = 1.0 - np.searchsorted(neg, thresholds, side="left") / neg.size
    pro = np.mean([1.0 - np.searchsorted(r, thresholds, side="left") / r.size for r in regions], axis=0)
    return fpr, pro


def curve_figure(runs: Sequence[Run], kind: str, seed: Seed = None) -> FigureOut | None:
    """Image ROC (``roc``) or PR (``pr``) curves from per-image records: one panel per category, a line per run
    from ``seed`` (default: each run's first seed). ``seed="all"``: a thin line per seed in the run's colour, and
    in each panel's legend the run once with its AUROC (ROC) or AP (PR) as mean ± sample std over seeds."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    every = seed == ALL_SEEDS
    chosen = pick_seeds(runs, None if every else seed)
    have = [r for r in runs if r.images]
    cats = [c for c in _categories(have) if any(r.images_of(c) for r in have)]
    if not cats:
        return None
    col = colors(runs)
    score, score_name = (roc_auc_score, "AUROC") if kind == "roc" else (average_precision_score, "AP")
    fig, axes = _grid(len(cats))
    for ax, cat in zip(axes, cats, strict=False):
        one_class = False
        for r in have:
            lines, values = [], []
            for s in r.seeds if every else [chosen[r]]:
                recs = r.images_of(cat, s)
                if not recs:
                    continue
                if len({x["label"] for x in recs}) < 2:
                    one_class = True
                    continue
                x, y = image_curve(recs, kind)
                values.append(score([x["label"] for x in recs], [x["score"] for x in recs]))
                style = {"color": col[r.label][0], "lw": 0.8 if every else 1.5, "label": "_nolegend_"}
                lines += ax.plot(x, y, **style) if kind == "roc" else ax.step(x, y, where="post", **style)
            if lines:
                lines[0].set_label(f"{r.label} ({score_name} {_mean_std(values)})" if every else r.label)
        if every and ax.get_lines():
            ax.legend(fontsize=6, loc="lower right")
        if one_class and not ax.get_lines():
            ax.text(0.5, 0.5, "one class of images only:\nno curve", ha="center", va="center", fontsize=7,
                    color="0.4", transform=ax.transAxes)  # fmt: skip
        ax.set_title(cat, fontsize=9)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_xlabel("false-positive rate" if kind == "roc" else "recall", fontsize=8)
        ax.set_ylabel("true-positive rate" if kind == "roc" else "precision", fontsize=8)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
    labelled = [ax for ax in axes if any(not ln.get_label().startswith("_") for ln in ax.get_lines())]
    if not every and labelled:
        labelled[0].legend(fontsize=7, loc="lower right")
    name = "image_roc" if kind == "roc" else "image_pr"
    title = "Image ROC curves" if kind == "roc" else "Image precision-recall curves"
    if every:
        several = any(len(r.seeds) > 1 for r in have)
        title = _titled(title, "every seed" if several else "")
        cap = (
            "One panel per category, a thin line per seed of each run (from the per-image records); the legend "
            f"gives each run's {score_name} as mean ± sample standard deviation (ddof=1) over its seeds."
        )
    else:
        note = seed_note(have, chosen)
        title = _titled(title, note)
        cap = "One panel per category, a line per run (from the per-image records" + (f"; {note})." if note else ").")
    fig.suptitle(title)
    fig.tight_layout()
    return FigureOut(name, title, cap, fig)


def pixel_figure(runs: Sequence[Run], kind: str, seed: int | None = None) -> FigureOut | None:
    """Pixel ROC (``pixel_roc``) or PRO (``pro``) curves from the saved maps of ``seed`` (default: each run's
    first seed); runs without saved maps are left out."""
    from sklearn.metrics import roc_curve

    chosen = pick_seeds(runs, seed)
    have = [r for r in runs if has_maps(r.path)]
    cats = _categories(have)
    if not cats:
        return None
    col = colors(runs)
    fig, axes = _grid(len(cats))
    for ax, cat in zip(axes, cats, strict=False):
        for r in have:
            if cat not in r.categories():
                continue
            saved = read_maps(r.path, cat, seed=chosen[r])
            if saved.masks is None or not saved.masks.any():
                continue
            if kind == "pixel_roc":
                x, y, _ = roc_curve(saved.masks.ravel(), saved.maps.ravel())
            else:
                x, y = pro_curve(saved.maps, saved.masks)
            ax.plot(x, y, color=col[r.label][0], label=r.label, lw=1.5)
        ax.set_title(cat, fontsize=9)
        ax.set_xlabel("false-positive rate (pixels)", fontsize=8)
        ax.set_ylabel("true-positive rate" if kind == "pixel_roc" else "per-region overlap", fontsize=8)
        ax.set_ylim(-0.01, 1.01)
    axes[0].legend(fontsize=7, loc="lower right")
    note = seed_note(have, chosen)
    title = _titled("Pixel ROC curves" if kind == "pixel_roc" else "PRO curves (FPR up to 0.3)", note)
    fig.suptitle(title)
    fig.tight_layout()
    cap = "From saved maps (--save-maps" + (f"; {note}" if note else "") + "); runs without them are not drawn."
    return FigureOut(kind, title, cap, fig)


def _reported_lookup() -> Callable[[str, str, str, Run], float]:
    from zsad_bench.tables import canonical_protocol, load_reported

    try:
        rep = load_reported()
    except ZsadError:
        return lambda *a: math.nan
    table = {
        (r.protocol, r.metric, r.category, str(r.method).lower()): float(r.value) for r in rep.itertuples(index=False)
    }

    def find(leg: str, metric: str, category: str, run: Run) -> float:
        label = run.data.get("method_label") or run.method
        # the papers name variants by backbone: "SPG (DINOv3)" is SPG on dinov3
        for name in (label, run.method, f"{label} ({run.data.get('backbone')})"):
            v = table.get((canonical_protocol(leg), metric, category, str(name).lower()))
            if v is not None:
                return v
        return math.nan

    return find


def bar_figures(runs: Sequence[Run], metrics: Sequence[str] = BAR_METRICS) -> list[FigureOut]:
    """Per protocol leg: a panel per metric, grouped bars per category (mean over seeds), papers' values as markers."""
    col = colors(runs)
    reported = _reported_lookup()
    legs = list(dict.fromkeys(rec["protocol"] for r in runs for rec in r.records))
    out = []
    for leg in legs:
        present = [m for m in metrics if any(m in rec["metrics"] for r in runs for rec in r.records)]
        cats = list(dict.fromkeys(rec["category"] for r in runs for rec in r.records if rec["protocol"] == leg))
        fig, axes = plt.subplots(
            len(present), 1, figsize=(max(6, 0.9 * len(cats) * max(1, len(runs))), 2.6 * len(present)), squeeze=False
        )
        width = 0.8 / len(runs)
        any_reported = False
        for ax, metric in zip(axes[:, 0], present, strict=True):
            for j, r in enumerate(runs):
                xs = np.arange(len(cats)) + (j - (len(runs) - 1) / 2) * width
                vals = [100 * r.metric(c, metric, leg) for c in cats]
                ax.bar(xs, vals, width, color=col[r.label][0], label=r.label)
                rep = [100 * reported(leg, metric, c, r) for c in cats]
                if any(math.isfinite(v) for v in rep):
                    first_marks = not any(c.get_label() == "reported (paper)" for c in ax.collections)
                    any_reported = True
                    ax.scatter(
                        xs,
                        rep,
                        marker="_",
                        s=200,
                        color="black",
                        zorder=3,
                        linewidths=2,
                        label="reported (paper)" if first_marks else None,
                    )
            ax.set_xticks(np.arange(len(cats)), cats, fontsize=8, rotation=30 if len(cats) > 6 else 0)
            ax.set_ylabel(f"{metric} (%)", fontsize=8)
            ax.set_ylim(0, 100)
        axes[0, 0].legend(fontsize=7, ncol=min(4, len(runs) + 1), loc="lower left")
        title = f"Per-category metrics, {leg}"
        fig.suptitle(title)
        fig.tight_layout()
        cap = "Bars: measured (mean over seeds)." + (
            " Black ticks: the papers' reported values." if any_reported else ""
        )
        out.append(FigureOut(f"bars_{_safe(leg)}", title, cap, fig))
    return out


def histogram_figures(runs: Sequence[Run], seed: int | None = None) -> list[FigureOut]:
    """Per run: image-score histograms of good vs anomalous images of ``seed`` (default: the run's first seed),
    a panel per category."""
    chosen = pick_seeds(runs, seed)
    out = []
    for r in runs:
        cats = [c for c in r.categories() if r.images_of(c, chosen[r])]
        if not cats:
            continue
        fig, axes = _grid(len(cats), 2.8)
        for ax, cat in zip(axes, cats, strict=False):
            recs = r.images_of(cat, chosen[r])
            scores = np.array([x["score"] for x in recs], dtype=float)
            labels = np.array([x["label"] for x in recs])
            bins = np.histogram_bin_edges(scores, bins=20)
            ax.hist(scores[labels == 0], bins=bins, alpha=0.6, color=OKABE_ITO[0], label="good")
            ax.hist(scores[labels == 1], bins=bins, alpha=0.6, color=OKABE_ITO[3], label="anomalous")
            ax.set_title(cat, fontsize=9)
            ax.set_xlabel("image score", fontsize=8)
        axes[0].legend(fontsize=7)
        title = _titled(f"Score histograms, {r.label}", seed_note([r], chosen))
        fig.suptitle(title)
        fig.tight_layout()
        out.append(FigureOut(f"hist_{_safe(r.label)}", title, "Image scores of good vs anomalous test images.", fig))
    return out


def run_mean(run: Run, metric: str) -> float:
    """Mean over categories (and legs) of the seed-mean ``metric``."""
    pairs = dict.fromkeys((rec["protocol"], rec["category"]) for rec in run.records)
    vals = [run.metric(c, metric, leg) for leg, c in pairs]
    vals = [v for v in vals if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def fewshot_figure(runs: Sequence[Run], metrics: Sequence[str] = ("image_auroc", "pixel_auroc")) -> FigureOut | None:
    """Metric vs k for few-shot runs (one line per method; needs runs at two or more k)."""
    shots = {r: (r.config.get("run") or {}).get("shots") for r in runs}
    groups: dict[str, list[Run]] = {}
    for r, k in shots.items():
        if k:
            groups.setdefault(str(r.data.get("method_label") or r.method), []).append(r)
    groups = {m: g for m, g in groups.items() if len({shots[r] for r in g}) >= 2}
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    palette = {m: OKABE_ITO[i % 8] for i, m in enumerate(sorted(groups))}
    for ax, metric in zip(axes[0], metrics, strict=True):
        for m, g in sorted(groups.items()):
            g = sorted(g, key=lambda r: shots[r])
            ax.plot(
                [shots[r] for r in g], [100 * run_mean(r, metric) for r in g], marker="o", color=palette[m], label=m
            )
        ax.set_xlabel("k (normal reference images)")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_xscale("log", base=2)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Few-shot: metric vs k")
    fig.tight_layout()
    return FigureOut("fewshot", "Few-shot: metric vs k", "Mean over categories; one line per method.", fig)


def _varying(flat: list[dict]) -> list[str]:
    """Config keys that differ across ``flat``, less those fixed by another one (a backbone's image size)."""
    keys = sorted(k for k in {k for f in flat for k in f} if len({repr(f.get(k)) for f in flat}) > 1)
    keys = [k for k in keys if k != "run.shots"]  # k is the few-shot plot's axis
    kept: list[str] = []
    for k in sorted(keys, key=lambda k: (not k.endswith("backbone"), k)):
        if not any(
            len({(repr(f.get(j)), repr(f.get(k))) for f in flat}) == len({repr(f.get(j)) for f in flat}) for j in kept
        ):
            kept.append(k)
    return sorted(kept)


def _one_key(method: str, key: str, group: list[Run], flat: list[dict], vals: dict, metric: str) -> FigureOut:
    xs = [f.get(key) for f in flat]
    short = key.split(".")[-1]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    if all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [100 * vals[group[i]] for i in order], marker="o", color=OKABE_ITO[0])
    else:
        order = sorted(range(len(xs)), key=lambda i: _order(xs[i]))
        ax.bar([str(xs[i]) for i in order], [100 * vals[group[i]] for i in order], color=OKABE_ITO[0])
    ax.set_xlabel(short)
    ax.set_ylabel(f"{metric} (%)")
    title = f"{method}: {metric} vs {short}"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    cap = f"Mean over categories of {len(group)} runs differing only in {short}."
    return FigureOut(f"ablation_{_safe(method)}_{short}", title, cap, fig)


def _two_keys(method: str, keys: list[str], group: list[Run], flat: list[dict], vals: dict, metric: str) -> FigureOut:
    a, b = keys
    av = sorted({f.get(a) for f in flat}, key=_order)
    bv = sorted({f.get(b) for f in flat}, key=_order)
    grid = np.full((len(av), len(bv)), np.nan)
    for r, f in zip(group, flat, strict=True):
        grid[av.index(f.get(a)), bv.index(f.get(b))] = 100 * vals[r]
    fig, ax = plt.subplots(figsize=(1.1 * len(bv) + 2.5, 0.8 * len(av) + 1.8))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i in range(len(av)):
        for j in range(len(bv)):
            if math.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8, color="white")
    ax.set_xticks(range(len(bv)), [str(v) for v in bv])
    ax.set_yticks(range(len(av)), [str(v) for v in av])
    sa, sb = a.split(".")[-1], b.split(".")[-1]
    ax.set_xlabel(sb)
    ax.set_ylabel(sa)
    fig.colorbar(im, ax=ax, label=f"{metric} (%)")
    title = f"{method}: {metric}, {sa} x {sb}"
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    cap = f"Mean over categories of {len(group)} runs differing only in {sa} and {sb}."
    return FigureOut(f"ablation_{_safe(method)}_{sa}_x_{sb}", title, cap, fig)


def ablation_figures(runs: Sequence[Run], metric: str = "image_auroc") -> list[FigureOut]:
    """Ablations among runs of one method on one protocol: one varied config value -> line (numeric) or bars
    (e.g. backbone); two varied values filling most of their grid (e.g. SAE width x k) -> heat map; otherwise
    one plot per varied value over the runs that keep the others at their most common value (several 1-D
    sweeps in one folder). Values are the mean ``metric`` over categories; shots are left to the few-shot plot."""
    out = []
    by_method: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        by_method.setdefault((r.method, r.protocol), []).append(r)
    for (method, _), group in sorted(by_method.items()):
        if len(group) < 2:
            continue
        flat = [flat_config(r) for r in group]
        keys = _varying(flat)
        vals = {r: run_mean(r, metric) for r in group}
        if len(keys) == 1:
            out.append(_one_key(method, keys[0], group, flat, vals, metric))
            continue
        if len(keys) == 2:
            cells = {(repr(f.get(keys[0])), repr(f.get(keys[1]))) for f in flat}
            n_a, n_b = (len({repr(f.get(k)) for f in flat}) for k in keys)
            if len(cells) == len(group) and len(cells) >= 0.75 * n_a * n_b:
                out.append(_two_keys(method, keys, group, flat, vals, metric))
                continue
        for key in keys:
            others = [k for k in keys if k != key]
            base = {k: max({repr(f.get(k)) for f in flat}, key=[repr(f.get(k)) for f in flat].count) for k in others}
            idx = [i for i, f in enumerate(flat) if all(repr(f.get(k)) == base[k] for k in others)]
            if len({repr(flat[i].get(key)) for i in idx}) >= 2:
                sub = [group[i] for i in idx]
                out.append(_one_key(method, key, sub, [flat[i] for i in idx], vals, metric))
    return out


def _order(value: object) -> tuple:
    """Numbers in numeric order, then everything else by its text."""
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    return (0, value, "") if numeric else (1, 0, repr(value))


def all_figures(runs: Sequence[Run], seed: Seed = None) -> list[FigureOut]:
    """Every figure the runs allow, in report order. Curves, histograms and pixel figures show ``seed`` (default:
    each run's first); ``seed="all"`` draws every seed in the image ROC and PR curves, the first elsewhere."""
    one = None if seed == ALL_SEEDS else seed
    figs: list[FigureOut | None] = [curve_figure(runs, "roc", seed), curve_figure(runs, "pr", seed)]
    figs += [pixel_figure(runs, "pixel_roc", one), pixel_figure(runs, "pro", one)]
    figs += bar_figures(runs) + histogram_figures(runs, one)
    figs += [fewshot_figure(runs), *ablation_figures(runs)]
    return [f for f in figs if f is not None]


def save(fig: FigureOut, out_dir: Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``fig`` as ``out_dir/<name>.<fmt>`` (PNG raster at 150 dpi, PDF vector)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        p = out_dir / f"{fig.name}.{fmt}"
        fig.figure.savefig(p, dpi=150 if fmt == "png" else None)
        paths.append(p)
    return paths


def png_bytes(fig: FigureOut, dpi: int = 110) -> bytes:
    import io

    buf = io.BytesIO()
    fig.figure.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def close(figs: Sequence[FigureOut]) -> None:
    for f in figs:
        plt.close(f.figure)
