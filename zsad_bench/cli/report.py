"""``zsad-bench report``: one self-contained HTML report of results files or a sweep folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from zsad_bench.cli.common import non_negative_int, output_file, seed_or_all


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML file: tables, figures, overlays, provenance",
        description="Write one HTML file that opens offline in any browser (figures embedded as data URIs): the "
        "main table, per-category tables, the figures of `zsad-bench plot`, worst-image overlay grids of runs with "
        "saved maps, and each run's provenance (config, package versions, git commit, device, timings).",
    )
    p.add_argument("results", nargs="+", type=Path, help="results JSON files or folders of them (a sweep)")
    p.add_argument(
        "--out", "-o", type=output_file, help="HTML path (default: report.html beside the first results file)"
    )
    p.add_argument("--overlays", type=non_negative_int, default=4, help="images per overlay grid (0: none; default: 4)")
    p.add_argument(
        "--seed",
        type=seed_or_all,
        metavar="N|all",
        help="seed of the curves, histograms and overlays of multi-seed runs (default: each run's first); 'all': "
        "every seed in the image ROC and PR curves, as `plot --seed all`",
    )
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from zsad_bench.errors import ZsadError
    from zsad_bench.results import results_files
    from zsad_bench.viz.report import build_report

    out = args.out or results_files(args.results)[0].parent / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise ZsadError(f"--out {out}: the report is an HTML file; use a .html name")
    path, names = build_report(args.results, out, overlays=args.overlays, seed=args.seed)
    print(f"report with {len(names)} figures: {path} (open it in any browser, offline)")
    return 0
