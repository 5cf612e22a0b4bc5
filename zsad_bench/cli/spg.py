"""SPG commands: ``zsad-bench ablate {sae-grid,tau,backbone,guide-topk}`` and ``zsad-bench atoms RUN``.

Each ablation point is one ordinary run (one results file under ``--out-dir``) whose method label
encodes the point, so ``zsad-bench table results/ablations/<dir>/*.json --columns method`` renders
the sweep. Fitted SAEs are reused across points through SPG's artifact cache (keyed by backbone,
aux data, width, k and the Stage-1 settings); the tau sweep reuses the fitted guides as well, since
aggregation options only affect scoring.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import heapq
import re
import textwrap
from pathlib import Path
from typing import Any

from zsad_bench.cli.common import add_run_arguments
from zsad_bench.errors import ZsadError

# The paper's sweeps (shared/spec/SPG.md §8).
WIDTHS = (2048, 3072, 4096, 6144, 8192)
KS = (8, 16, 32, 64, 128)
TAUS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0)
BACKBONES = ("dinov3:448", "dinov2:448", "openclip:518", "siglip:448")
TOPKS = (8, 16, 32, 64, 128, 256, 512, 1024)

LIST_ATOMS = 40  # active atoms printed by `atoms` unless --list-all


def add_parser(sub: argparse._SubParsersAction) -> None:
    ablate = sub.add_parser(
        "ablate",
        help="SPG ablation sweeps (one results file per point)",
        description="Run one of the SPG paper's ablations; each point writes a results file under --out-dir whose "
        "method label names the point (render with: zsad-bench table DIR/*.json --columns method).",
    )
    kinds = ablate.add_subparsers(dest="ablation", metavar="ABLATION", required=True)
    specs = (
        ("sae-grid", "SAE width x TopK k grid (retrains both stages per point)"),
        ("tau", "image-score aggregation: max, mean and log-sum-exp over --taus (no retraining)"),
        ("backbone", "backbone sweep (NAME or NAME:SIZE; retrains both stages)"),
        ("guide-topk", "TopK guides (spg-topk) over --topks, plus the L1 guides as reference"),
    )
    for name, text in specs:
        p = kinds.add_parser(name, help=text, description=text)
        add_run_arguments(p, method_required=False)
        p.add_argument("--out-dir", type=Path, help="folder of the point files (default: results/ablations/<id>)")
        p.add_argument("--resume", action="store_true", help="skip points whose results file is complete")
        if name == "sae-grid":
            p.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS), help="SAE widths H")
            p.add_argument("--ks", type=int, nargs="+", default=list(KS), help="SAE TopK values k")
        elif name == "tau":
            p.add_argument("--taus", type=float, nargs="+", default=list(TAUS), help="log-sum-exp temperatures")
        elif name == "backbone":
            p.add_argument("--backbones", nargs="+", default=list(BACKBONES), help="NAME or NAME:SIZE entries")
        else:
            p.add_argument("--topks", type=int, nargs="+", default=list(TOPKS), help="coefficients kept per guide")
        p.set_defaults(func=_ablate)

    atoms = sub.add_parser(
        "atoms",
        help="SPG interpretability: the anomaly guide's atoms and their top auxiliary patches",
        description="List the active atoms of a fitted SPG run's anomaly guide with their coefficients and render, "
        "for the top atoms, the auxiliary images with the strongest patch activation (heat-map overlays).",
    )
    atoms.add_argument("run", type=Path, metavar="RUN", help="results JSON of a finished spg / spg-topk run")
    atoms.add_argument("--top", type=int, default=4, help="atoms to render (largest coefficients; default 4)")
    atoms.add_argument("--patches", type=int, default=8, help="top patches (distinct images) per atom (default 8)")
    atoms.add_argument("--out", "-o", type=Path, help="PNG path (default: RUN with suffix -atoms.png)")
    atoms.add_argument("--leg", type=int, default=0, help="protocol leg index of the run (default 0)")
    atoms.add_argument("--seed", type=int, help="seed of the run's checkpoint (default: its first seed)")
    atoms.add_argument("--device", default="cpu", help="device for the SAE encode (default cpu)")
    atoms.add_argument("--list-all", action="store_true", help=f"list every active atom, not the first {LIST_ATOMS}")
    atoms.set_defaults(func=_atoms)


# ---------------------------------------------------------------------------------------------- ablate
def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", label).strip("_")


def _fmt(value: float) -> str:
    return f"{value:g}"


def ablation_points(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The points of the requested sweep: ``{"label", "method", "backbone", "image_size", "config"}``."""
    base = args.method or ("spg-topk" if args.ablation == "guide-topk" else "spg")
    point = {"method": base, "backbone": args.backbone, "image_size": args.image_size, "config": {}}
    if args.ablation == "sae-grid":
        return [
            {**point, "label": f"SPG H={h} k={k}", "config": {"sae_width": h, "sae_k": k}}
            for h in args.widths
            for k in args.ks
        ]
    if args.ablation == "tau":
        fixed = [
            {**point, "label": "SPG max", "config": {"aggregation": "max"}},
            {**point, "label": "SPG mean", "config": {"aggregation": "mean"}},
        ]
        return fixed + [
            {**point, "label": f"SPG lse tau={_fmt(t)}", "config": {"aggregation": "lse", "agg_tau": t}}
            for t in args.taus
        ]
    if args.ablation == "backbone":
        out = []
        for entry in args.backbones:
            name, _, size = entry.partition(":")
            if size and not size.isdigit():
                raise ZsadError(f"--backbones {entry}: expected NAME or NAME:SIZE, e.g. dinov3:448")
            image_size = int(size) if size else args.image_size
            label = f"SPG {name}" + (f"@{image_size}" if image_size else "")
            out.append({**point, "label": label, "backbone": name, "image_size": image_size})
        return out
    return [{**point, "label": "SPG L1", "method": "spg"}] + [
        {**point, "label": f"SPG-TopK k_g={k}", "config": {"guide_topk": k}} for k in args.topks
    ]


def _ablate(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from zsad_bench.cli.common import parse_set
    from zsad_bench.cli.run import spec_from_args
    from zsad_bench.results import RunResult, atomic_write_text
    from zsad_bench.runner import run_experiment

    args.method = args.method or ("spg-topk" if args.ablation == "guide-topk" else "spg")
    points = ablation_points(args)
    out_dir = args.out_dir or Path("results") / "ablations" / f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{args.ablation}"
    user_config = parse_set(args.set)
    rows = []
    for pt in points:
        path = out_dir / f"{_slug(pt['label'])}.json"
        if args.resume and path.exists() and RunResult.load(path).complete:
            print(f"[ablate] {pt['label']}: complete, skipped ({path})")
            result = RunResult.load(path)
        else:
            spec = spec_from_args(args)
            spec.method = pt["method"]
            spec.backbone = pt["backbone"]
            spec.image_size = pt["image_size"]
            spec.method_config = {**user_config, **pt["config"]}
            spec.label = pt["label"]
            spec.out = path
            spec.resume = args.resume
            result, _ = run_experiment(spec)
        rows += _point_rows(result)
    summary = tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3f")
    atomic_write_text(out_dir / "summary.md", f"# SPG ablation: {args.ablation}\n\n{summary}\n")
    print(summary)
    print(
        f"\n{len(points)} results files in {out_dir}; render with: zsad-bench table {out_dir}/*.json --columns method"
    )
    return 0


def _point_rows(result: Any) -> list[dict[str, Any]]:
    """Per protocol leg: mean of each metric over categories and seeds, plus the guide sparsity."""
    by_leg: dict[str, dict[str, list[float]]] = {}
    for rec in result.records:
        leg = by_leg.setdefault(rec.protocol or result.protocol, {})
        for name, value in rec.metrics.items():
            leg.setdefault(name, []).append(value)
    rows = []
    for leg, metrics in by_leg.items():
        sparsity = [v for k, v in result.summary.items() if k.startswith(f"guide_sparsity|{leg}|")]
        row: dict[str, Any] = {"point": result.method_label, "leg": leg}
        row["guide sparsity"] = sum(sparsity) / len(sparsity) if sparsity else float("nan")
        row.update({m: sum(v) / len(v) for m, v in metrics.items()})
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- atoms
def top_patches(detector: Any, source: Any, atoms: list[int], n: int, batch_size: int = 16) -> list[list[tuple]]:
    """Per atom, the ``n`` aux images whose best patch activates it most, best first.

    Each entry is ``(activation, sample index, heat (h, w) tensor, (row, col) of the best patch)``;
    images whose best activation is 0 are dropped (as the release does).
    """
    heaps: list[list[tuple]] = [[] for _ in atoms]
    offset = 0
    counter = 0
    for batch in source.batches(batch_size):
        act = detector.atom_activations(batch.features, atoms)  # (B, A, h, w)
        w = act.shape[-1]
        for b in range(act.shape[0]):
            for a in range(len(atoms)):
                heat = act[b, a]
                best = float(heat.max())
                if best <= 0:
                    continue
                pos = int(heat.argmax())
                item = (best, counter, offset + b, heat.clone(), (pos // w, pos % w))
                counter += 1
                if len(heaps[a]) < n:
                    heapq.heappush(heaps[a], item)
                elif best > heaps[a][0][0]:
                    heapq.heapreplace(heaps[a], item)
        offset += act.shape[0]
    return [[(s, i, h, rc) for s, _, i, h, rc in sorted(heap, key=lambda t: -t[0])] for heap in heaps]


def render_atoms(
    source: Any, chosen: list[tuple[int, float]], found: list[list[tuple]], n: int, size: int, out: Path
) -> None:
    """A PNG grid: one row per atom, ``n`` tiles of image + bilinear activation heat map (jet, alpha 0.45)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch.nn.functional as F
    from matplotlib.patches import Rectangle

    from zsad_bench.data.io import load_image

    fig, axes = plt.subplots(len(chosen), n, figsize=(2.2 * n, 2.4 * len(chosen)), squeeze=False)
    for row, ((atom, coef), hits) in enumerate(zip(chosen, found, strict=True)):
        vmax = hits[0][0] if hits else 1.0
        for col in range(n):
            ax = axes[row][col]
            ax.set_axis_off()
            if col >= len(hits):
                continue
            act, idx, heat, (r, c) = hits[col]
            sample = source.samples[idx]
            img = np.asarray(load_image(sample.image_path).resize((size, size)))
            up = F.interpolate(heat[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
            ax.imshow(img)
            ax.imshow(up.numpy(), cmap="jet", alpha=0.45, vmin=0.0, vmax=vmax)
            cell_h, cell_w = size / heat.shape[0], size / heat.shape[1]
            ax.add_patch(Rectangle((c * cell_w, r * cell_h), cell_w, cell_h, fill=False, edgecolor="white", lw=1.2))
            ax.set_title(f"{sample.category} z={act:.2f}", fontsize=7)
        axes[row][0].text(
            -0.08, 0.5, f"atom #{atom}\nc={coef:.3g}", transform=axes[row][0].transAxes, ha="right", va="center"
        )
    fig.suptitle("SPG anomaly-guide atoms: top auxiliary patches (white box) and activation maps", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _atoms(args: argparse.Namespace) -> int:
    from zsad_bench.runner import rebuild

    if args.top < 1 or args.patches < 1:
        raise ZsadError("--top and --patches must be >= 1")
    detector, source = rebuild(args.run, seed=args.seed, leg_index=args.leg, device=args.device)
    if not hasattr(detector, "anomaly_atoms"):
        raise ZsadError(f"{args.run}: a run of method '{detector.name}'; atoms needs an spg or spg-topk run")
    active = detector.anomaly_atoms()
    shown = active if args.list_all else active[:LIST_ATOMS]
    more = "" if len(shown) == len(active) else f" (first {len(shown)}; --list-all for all)"
    print(f"anomaly guide: {len(active)} active atoms (coefficient > 0), largest first{more}")
    print(textwrap.fill("  ".join(f"#{a}:{c:.4g}" for a, c in shown), width=110, break_on_hyphens=False))
    if not active:
        raise ZsadError(f"{args.run}: the anomaly guide has no active atom; nothing to render")
    chosen = active[: args.top]
    found = top_patches(detector, source, [a for a, _ in chosen], args.patches)
    for (atom, coef), hits in zip(chosen, found, strict=True):
        names = ", ".join(f"{source.samples[i].key}@{rc}:{s:.3g}" for s, i, _, rc in hits)
        print(f"atom #{atom} (c={coef:.4g}): {names or 'never fires on the auxiliary set'}")
    out = args.out or args.run.with_name(f"{args.run.stem}-atoms.png")
    render_atoms(source, chosen, found, args.patches, detector.backbone.image_size, out)
    print(f"atom grid written to {out}")
    return 0
