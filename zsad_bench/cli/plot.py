"""``zsad-bench plot``: curves, bar charts, histograms, few-shot and ablation plots as PNG + PDF."""

from __future__ import annotations

import argparse
from pathlib import Path

from zsad_bench.cli.common import output_folder, seed_or_all
from zsad_bench.viz import NEEDS_MAPS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="ROC/PR/PRO curves, per-category bars, score histograms, few-shot and ablation plots",
        description="Draw every figure the results allow: image ROC and PR curves and good-vs-anomalous score "
        "histograms (from per-image records), pixel ROC and PRO curves (from saved maps), per-category bar charts "
        "with the papers' reported values as markers, metric-vs-k curves (few-shot runs at several --shots) and "
        "ablation plots (runs of one method differing in one config value: line or bars; in two: heat map). "
        "PNG and PDF (vector), colour-blind-safe Okabe-Ito colours, one colour per run in every figure. Curves and "
        "histograms of multi-seed runs show one seed (--seed N; default: the first) and their titles say which; "
        "--seed all draws every seed in the image ROC and PR curves (thin lines, AUROC/AP as mean ± sample std "
        f"over seeds in the legend). Bars are means over seeds. {NEEDS_MAPS}",
    )
    p.add_argument("results", nargs="+", type=Path, help="results JSON files or folders of them (a sweep)")
    p.add_argument(
        "--out", "-o", type=output_folder, help="output folder (default: figures/ beside the first results file)"
    )
    p.add_argument("--format", nargs="+", choices=("png", "pdf", "svg"), default=["png", "pdf"], help="file formats")
    p.add_argument(
        "--seed",
        type=seed_or_all,
        metavar="N|all",
        help="seed of the curves and histograms (every results file must have it; default: each run's first); "
        "'all': every seed as a thin line in the image ROC and PR curves (the first seed elsewhere)",
    )
    p.set_defaults(func=_plot)


def _plot(args: argparse.Namespace) -> int:
    from zsad_bench.errors import ZsadError
    from zsad_bench.viz import plots
    from zsad_bench.viz.runs import load_runs

    runs = load_runs(args.results)
    out = args.out or runs[0].path.parent / "figures"
    figs = plots.all_figures(runs, args.seed)
    if not figs:
        raise ZsadError(f"{runs[0].path}: nothing to plot (no records); pass results files of `zsad-bench run`")
    for f in figs:
        plots.save(f, out, args.format)
    plots.close(figs)
    print(f"{len(figs)} figures ({', '.join(args.format)}) in {out}/: {', '.join(f.name for f in figs)}")
    return 0
