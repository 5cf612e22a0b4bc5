"""``zsad-bench ablate {sae-grid,tau,backbone,guide-topk}``: the SPG paper's ablations as preset sweeps.

Each ablation is a list of points over the sweep machinery (:mod:`zsad_bench.sweep`): features are
extracted once, each SAE is fitted once and reused by every point that shares it (the tau sweep and
the guide variants reuse the SAE; tau points even reuse the fitted guides, since aggregation only
affects scoring), points run on ``--engine local`` or ``ray``, and an interrupted ablation continues
with ``--resume``. Each point writes ``<label>.json`` under ``--out-dir``; the method label names the
point, so ``zsad-bench table DIR --columns method`` renders the ablation.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
from pathlib import Path
from typing import Any

from zsad_bench.cli.common import add_run_arguments, output_folder
from zsad_bench.errors import ZsadError
from zsad_bench.sweep import add_engine_arguments

# The paper's sweeps (shared/spec/SPG.md §8).
WIDTHS = (2048, 3072, 4096, 6144, 8192)
KS = (8, 16, 32, 64, 128)
TAUS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0)
BACKBONES = ("dinov3:448", "dinov2:448", "openclip:518", "siglip:448")
TOPKS = (8, 16, 32, 64, 128, 256, 512, 1024)


def add_parser(sub: argparse._SubParsersAction) -> None:
    ablate = sub.add_parser(
        "ablate",
        help="SPG ablation sweeps (one results file per point)",
        description="Run one of the SPG paper's ablations as a sweep; each point writes a results file under "
        "--out-dir whose method label names the point (render with: zsad-bench table DIR --columns method).",
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
        p.add_argument(
            "--out-dir", type=output_folder, help="folder of the point files (default: results/ablations/<id>)"
        )
        p.add_argument("--resume", action="store_true", help="continue in an --out-dir holding earlier points")
        p.add_argument("--dry-run", action="store_true", help="list the points and whether each is done or to run")
        if name == "sae-grid":
            p.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS), help="SAE widths H")
            p.add_argument("--ks", type=int, nargs="+", default=list(KS), help="SAE TopK values k")
        elif name == "tau":
            p.add_argument("--taus", type=float, nargs="+", default=list(TAUS), help="log-sum-exp temperatures")
        elif name == "backbone":
            p.add_argument("--backbones", nargs="+", default=list(BACKBONES), help="NAME or NAME:SIZE entries")
        else:
            p.add_argument("--topks", type=int, nargs="+", default=list(TOPKS), help="coefficients kept per guide")
        add_engine_arguments(p)
        p.set_defaults(func=_ablate)


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


def ablation_grid(args: argparse.Namespace) -> Any:
    """The ablation as a sweep :class:`~zsad_bench.sweep.plan.Grid`: the run options plus each point's."""
    from zsad_bench.cli.run import run_actions
    from zsad_bench.sweep.config import _set_text
    from zsad_bench.sweep.plan import Grid, Variant

    base = {d: getattr(args, d) for d in run_actions() if hasattr(args, d) and d not in ("out", "resume")}
    user = list(args.set or [])
    variants = []
    for pt in ablation_points(args):
        sets = user + [f"{k}={_set_text(v)}" for k, v in pt["config"].items()]
        options = {**base, "method": pt["method"], "backbone": pt["backbone"], "image_size": pt["image_size"]}
        options.update(set=sets, label=pt["label"])
        variants.append(Variant(options, None, _slug(pt["label"]), {"point": pt["label"]}))
    return Grid(None, variants)


def _ablate(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from zsad_bench.cli.sweep import execute
    from zsad_bench.results import RunResult, atomic_write_text
    from zsad_bench.sweep.plan import make_plan, points_of

    args.method = args.method or ("spg-topk" if args.ablation == "guide-topk" else "spg")
    grid = ablation_grid(args)
    out_dir = args.out_dir or Path("results") / "ablations" / f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{args.ablation}"
    points = points_of(grid)
    existing = [p for p in points if (out_dir / p.results_name).exists()]
    if existing and not args.resume and not args.dry_run:
        raise ZsadError(f"{out_dir / existing[0].results_name}: results file exists; pass --resume to continue")
    plan = make_plan(points, grid.fill_shard)
    code = execute(plan, out_dir, args, None, None, f"ablate {args.ablation}")
    if args.dry_run:
        return code
    rows = []
    for p in points:
        path = out_dir / p.results_name
        if path.is_file():
            rows += _point_rows(RunResult.load(path))
    summary = tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3f")
    atomic_write_text(out_dir / "summary.md", f"# SPG ablation: {args.ablation}\n\n{summary}\n")
    print(summary)
    print(f"\n{len(points)} points in {out_dir}; render with: zsad-bench table {out_dir} --columns method")
    return code


def _point_rows(result: Any) -> list[dict[str, Any]]:
    """Per protocol leg: mean of each metric over categories and seeds, plus the guide sparsity."""
    by_leg: dict[str, dict[str, list[float]]] = {}
    for rec in result.records:
        leg = by_leg.setdefault(rec.protocol or result.protocol, {})
        for name, value in rec.metrics.items():
            leg.setdefault(name, []).append(value)
    rows = []
    for leg, metrics in by_leg.items():
        sparsity = [f.summary["guide_sparsity"] for f in result.fits if f.leg == leg and "guide_sparsity" in f.summary]
        row: dict[str, Any] = {"point": result.method_label, "leg": leg}
        row["guide sparsity"] = sum(sparsity) / len(sparsity) if sparsity else float("nan")
        row.update({m: sum(v) / len(v) for m, v in metrics.items()})
        rows.append(row)
    return rows
