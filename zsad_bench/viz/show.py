"""``zsad-bench show``: a qualitative grid per image (input | ground truth | anomaly map | overlay).

Maps come from ``--save-maps`` files, or, for zero-shot runs without them, from re-predicting the category
with the fitted detector rebuilt from the results file (:func:`zsad_bench.runner.rebuild`; features come from
the warm cache). Several runs are drawn side by side on the same images; each run's maps are scaled to
[0, 1] by that run's category-wide min and max so one colour scale serves all panels.

The overlay's contour is the boundary of ``map >= t*`` where ``t*`` maximises pixel F1 over the category's
maps (:func:`f1_threshold`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zsad_bench.errors import ZsadError
from zsad_bench.viz.maps import SavedMaps, has_maps, read_maps
from zsad_bench.viz.runs import Run, pick_seeds, seed_note

CONTOUR_RGB = (0, 255, 255)  # cyan: never produced by the 50% inferno blend (inferno has no blue-green)
MODES = ("worst", "best", "random")


def f1_threshold(maps: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
    """``(t*, F1(t*))``: the threshold on ``maps >= t`` with the highest pixel F1 against ``masks``.

    Exact over every distinct map value (sorted cumulative counts), as sklearn's precision-recall curve;
    hand-written because it runs over millions of pixels and needs the threshold, not only the score.
    """
    scores = np.asarray(maps, dtype=np.float64).ravel()
    truth = np.asarray(masks, dtype=bool).ravel()
    n_pos = int(truth.sum())
    if n_pos == 0:
        raise ZsadError("no anomalous pixels in this category; the F1-optimal threshold is undefined")
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order]
    tp = np.cumsum(t)
    fp = np.cumsum(~t)
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct value (ties together)
    f1 = 2 * tp[last] / (tp[last] + fp[last] + n_pos)
    best = int(np.argmax(f1))
    return float(s[last[best]]), float(f1[best])


def boundary(region: np.ndarray) -> np.ndarray:
    """Inner boundary of a boolean region: its pixels with a 4-neighbour outside it (image edge counts as outside)."""
    r = np.pad(np.asarray(region, dtype=bool), 1, constant_values=False)
    inner = r[1:-1, 1:-1]
    interior = inner & r[:-2, 1:-1] & r[2:, 1:-1] & r[1:-1, :-2] & r[1:-1, 2:]
    return inner & ~interior


def overlay(image: np.ndarray, scaled_map: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb uint8, contour)``: the heat map (inferno, 50%) over ``image`` with the boundary of ``map >= threshold``
    painted :data:`CONTOUR_RGB`. ``image`` is ``(S, S, 3)`` uint8, ``scaled_map`` ``(S, S)`` in [0, 1]."""
    from matplotlib import colormaps

    heat = colormaps["inferno"](np.clip(scaled_map, 0, 1))[..., :3] * 255
    rgb = np.round(0.5 * image.astype(np.float64) + 0.5 * heat).astype(np.uint8)
    contour = boundary(scaled_map >= threshold)
    rgb[contour] = CONTOUR_RGB
    return rgb, contour


@dataclass
class CategoryMaps:
    """One run's maps of a whole category with what the grid needs: masks, image scores, where they came from."""

    run: Run
    saved: SavedMaps
    scores: dict[str, float]
    origin: str

    def scaled(self) -> tuple[np.ndarray, float, float]:
        lo, hi = float(self.saved.maps.min()), float(self.saved.maps.max())
        return (self.saved.maps - lo) / (hi - lo if hi > lo else 1.0), lo, hi


def _scores_from_records(run: Run, category: str, seed: int | None) -> dict[str, float]:
    return {r["path"]: float(r["score"]) for r in run.images_of(category, seed)}


def _masks_for(paths: Sequence[str], target: str, size: int) -> np.ndarray:
    """Ground truth at ``size`` for image ``paths`` of dataset ``target`` (when the maps were saved without masks)."""
    from zsad_bench.data import open_dataset
    from zsad_bench.data.io import load_mask

    by_path = {str(s.image_path): s for s in open_dataset(target).samples}
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise ZsadError(f"{target}: image {missing[0]} of the results file is not in the dataset any more")
    return np.stack([load_mask(by_path[p], size) for p in paths])


def category_maps(
    run: Run,
    category: str,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
    seed: int | None = None,
) -> CategoryMaps:
    """The maps of ``category`` and ``seed`` (default: the first evaluated) from saved maps, else re-predicted
    (zero-shot runs); one-line error otherwise."""
    recs = [r for r in run.records if r["category"] == category]
    if not recs:
        raise ZsadError(f"{run.path}: no category '{category}'; it has {', '.join(run.categories())}")
    seed = recs[0]["seed"] if seed is None else seed
    rec = next((r for r in recs if r["seed"] == seed), None)
    if rec is None:
        has = ", ".join(map(str, dict.fromkeys(r["seed"] for r in recs)))
        raise ZsadError(f"{run.path}: no records of '{category}' for seed {seed}; it has seeds {has}")
    if has_maps(run.path):
        saved = read_maps(run.path, category, seed=rec.get("seed"), leg=rec.get("protocol"))
        if saved.masks is None:
            saved.masks = _masks_for(saved.paths, rec["target"], saved.maps.shape[-1])
        by_max = {p: float(m.max()) for p, m in zip(saved.paths, saved.maps, strict=True)}
        scores = _scores_from_records(run, category, seed) or by_max
        return CategoryMaps(run, saved, scores, "saved maps")
    if run.learning_type != "zero-shot":
        raise ZsadError(
            f"{run.path}: {run.label} is a {run.learning_type or 'non-zero-shot'} run without saved maps, so its "
            "maps cannot be rebuilt; re-run it with --save-maps SIZE"
        )
    saved, scores = repredict(run, rec, device, log)
    scores = _scores_from_records(run, category, seed) or scores
    return CategoryMaps(run, saved, scores, "re-predicted from checkpoint")


def repredict(
    run: Run, rec: dict, device: str = "cpu", log: Callable[[str], None] | None = None
) -> tuple[SavedMaps, dict[str, float]]:
    """Maps and scores of one category of a zero-shot run, from its fitted checkpoint and the feature cache.

    The target DataSource is the run's own (:meth:`zsad_bench.runner.Session.source`: the preset's layers,
    the recorded precision, cached features or preprocessed images).
    """
    import torch
    import torch.nn.functional as F

    from zsad_bench.data import open_dataset
    from zsad_bench.data.io import load_mask
    from zsad_bench.runner import load_fitted

    legs = [d["name"] for d in (run.config.get("run") or {}).get("legs", [])]
    leg = rec.get("protocol") or (legs[0] if legs else "")
    if leg not in legs:
        raise ZsadError(f"{run.path}: leg '{leg}' not in the run's config; the file is not from `zsad-bench run`")
    if log:
        log(f"{run.label}: no saved maps; re-predicting {rec['category']} from the fitted checkpoint")
    session, _ = load_fitted(run.path, seed=rec.get("seed"), leg_index=legs.index(leg), device=device)
    detector = session.detector
    samples = open_dataset(rec["target"]).select([rec["category"]], "test").samples
    size = int((run.config.get("run") or {}).get("eval_size") or session.image_size)
    source = session.source(samples)
    paths, maps, masks, scores = [], [], [], {}
    with torch.inference_mode():
        for batch, pred in detector.predict_source(source, 8):
            m = pred.maps.detach().float().cpu()
            if m.shape[-1] != size:
                m = F.interpolate(m[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            maps.append(m.numpy())
            for s, sc in zip(batch.samples, pred.scores.detach().float().cpu().tolist(), strict=True):
                paths.append(str(s.image_path))
                masks.append(load_mask(s, size))
                scores[str(s.image_path)] = float(sc)
    return SavedMaps(leg, rec["category"], paths, np.concatenate(maps), np.stack(masks)), scores


def choose(records: Sequence[tuple[str, int, float]], n: int, mode: str, seed: int = 0) -> list[str]:
    """Pick ``n`` image paths from ``(path, label, score)``.

    ``worst``: anomalous images with the lowest scores and normal images with the highest (by "badness", the
    score's rank among the category's images, turned around for anomalous ones); ``best``: the reverse;
    ``random``: a seeded draw.
    """
    if mode not in MODES:
        raise ZsadError(f"--{mode}: choose one of {', '.join('--' + m for m in MODES)}")
    items = list(records)
    if mode == "random":
        idx = np.random.default_rng(seed).permutation(len(items))[:n]
        return [items[i][0] for i in sorted(idx)]
    ranks = np.argsort(np.argsort([s for _, _, s in items], kind="stable"), kind="stable") / max(len(items) - 1, 1)
    badness = np.where(np.array([lab for _, lab, _ in items]) == 1, 1.0 - ranks, ranks)
    order = np.argsort(-badness if mode == "worst" else badness, kind="stable")
    return [items[i][0] for i in order[:n]]


def _load_rgb(path: str, size: int) -> np.ndarray:
    from PIL import Image

    from zsad_bench.data.io import load_image

    return np.asarray(load_image(Path(path)).resize((size, size), Image.BILINEAR))


def show_grid(
    runs: Sequence[Run],
    category: str,
    out: Path,
    n: int = 8,
    mode: str = "worst",
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
    seed: int | None = None,
) -> tuple[Path, list[str]]:
    """Draw the grid of ``n`` images of ``category`` for ``runs`` to ``out`` (PNG); returns (file, image paths).

    Maps and scores are those of ``seed`` (every run must have it; default: each run's first seed). Images are
    chosen from the first run's image scores; every run must have evaluated them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    chosen = pick_seeds(runs, seed)
    cms = [category_maps(r, category, device, log, chosen[r]) for r in runs]
    ref = cms[0]
    labels = {p: int(m.any()) for p, m in zip(ref.saved.paths, ref.saved.masks, strict=True)}
    picked = choose([(p, labels[p], ref.scores[p]) for p in ref.saved.paths], n, mode)
    n_cols = 2 + 2 * len(cms)
    fig, axes = plt.subplots(len(picked), n_cols, figsize=(1.9 * n_cols, 1.9 * len(picked) + 0.6), squeeze=False)
    size = ref.saved.maps.shape[-1]
    for j, cm in enumerate(cms):
        scaled, _, _ = cm.scaled()
        t, f1 = f1_threshold(scaled, cm.saved.masks)
        sub = SavedMaps(cm.saved.leg, category, cm.saved.paths, scaled, cm.saved.masks).select(picked)
        for i, path in enumerate(picked):
            img = _load_rgb(path, sub.maps.shape[-1])
            rgb, _ = overlay(img, sub.maps[i], t)
            axes[i, 2 + 2 * j].imshow(sub.maps[i], cmap="inferno", norm=Normalize(0, 1), interpolation="nearest")
            axes[i, 3 + 2 * j].imshow(rgb, interpolation="nearest")
            axes[i, 2 + 2 * j].set_xlabel(f"score {cm.scores[path]:.3g}", fontsize=7)
        axes[0, 2 + 2 * j].set_title(f"{cm.run.label}\nmap", fontsize=8)
        axes[0, 3 + 2 * j].set_title(f"{cm.run.label}\noverlay (F1 {f1:.2f})", fontsize=8)
    for i, path in enumerate(picked):
        axes[i, 0].imshow(_load_rgb(path, size), interpolation="nearest")
        mask = ref.saved.select([path]).masks[0]
        axes[i, 1].imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axes[i, 0].set_ylabel(f"{Path(path).parent.name}/{Path(path).name}"[-28:], fontsize=7)
    axes[0, 0].set_title("input", fontsize=8)
    axes[0, 1].set_title("ground truth", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    how = ", ".join(sorted({c.origin for c in cms}))
    note = seed_note(runs, chosen)
    fig.suptitle(f"{category}: {mode} {len(picked)} images ({how}{'; ' + note if note else ''})", fontsize=9)
    mappable = plt.cm.ScalarMappable(norm=Normalize(0, 1), cmap="inferno")
    fig.colorbar(
        mappable, ax=axes, fraction=0.02, pad=0.01, label="anomaly score (each run scaled to its category range)"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out, picked
