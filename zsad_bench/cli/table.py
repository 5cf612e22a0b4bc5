"""``zsad-bench table``: per-category, main and speed tables from saved results files."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from zsad_bench.cli.common import output_file
from zsad_bench.errors import ZsadError
from zsad_bench.metrics import METRICS
from zsad_bench.results import atomic_write_text
from zsad_bench.tables import FORMATS, load_reported, render, render_bench, scan


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "table",
        help="render result tables (Markdown, LaTeX, CSV) from results files",
        description=(
            "Per-category tables (rows: categories + Mean, columns: methods), a main table (target sets x "
            "metrics) and speed tables from results files or directories of them. Runs on the same targets share "
            "a table whatever their learning type; each column's setting (e.g. VisA -> MVTec AD, training-free, "
            "1-shot) and backbone are listed under it. Values in percent, best in bold. aupro (exact MVTec) and "
            "aupro_cflow (200 thresholds, rescaled) are separate metrics."
        ),
    )
    parser.add_argument("results", nargs="*", type=Path, help="results/benchmark JSON files or directories")
    parser.add_argument("--format", choices=FORMATS, default="md", help="output format (default: md)")
    parser.add_argument(
        "--with-reported",
        action="store_true",
        help="add the papers' reported figures (zsad_bench/reported/*.csv) as '(reported)' columns on the "
        "measured target sets",
    )
    parser.add_argument("--metric", nargs="+", choices=list(METRICS), metavar="M", help="only these metrics")
    parser.add_argument(
        "--columns",
        choices=("method", "backbone"),
        default="method",
        help="one column per method label (default) or per backbone",
    )
    parser.add_argument("--no-main", action="store_true", help="omit the main table")
    parser.add_argument(
        "--controls", action="store_true", help="show control runs (floors such as control-random), listed last"
    )
    parser.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="print interrupted runs in --format latex/csv too (always marked with a dagger)",
    )
    parser.add_argument(
        "--ci",
        type=float,
        metavar="LEVEL",
        help="add bootstrap confidence intervals (percent, e.g. 95) to image_auroc/image_ap cells; needs per-image "
        "records (results schema v2)",
    )
    parser.add_argument(
        "--bootstrap", type=int, default=1000, metavar="B", help="bootstrap replicates for --ci/--paired (default 1000)"
    )
    parser.add_argument("--ci-seed", type=int, default=0, metavar="S", help="seed of the bootstrap (default 0)")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="paired bootstrap test of the difference in mean image AUROC between the two runs of each table "
        "(same images; level from --ci, default 95)",
    )
    parser.add_argument("--out", type=output_file, help="write to FILE instead of standard output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.results and not args.with_reported:
        raise ZsadError("table: give results files/directories (or --with-reported to show the papers' figures)")
    found = scan(args.results) if args.results else None
    measured = found.evals if found is not None else pd.DataFrame()
    bench = found.bench if found is not None else pd.DataFrame()
    if args.format == "csv" and not measured.empty and not bench.empty:
        raise ZsadError("--format csv: evaluation and benchmark files have different columns; tabulate them separately")
    parts = []
    if args.with_reported:
        reported = load_reported()  # render keeps only the target sets that were measured
        measured = pd.concat([measured, reported], ignore_index=True) if not measured.empty else reported
    if not measured.empty:
        parts.append(
            render(
                measured,
                args.format,
                metrics=args.metric,
                columns=args.columns,
                main=not args.no_main,
                controls=args.controls,
                allow_incomplete=args.allow_incomplete,
                ci=args.ci,
                n_boot=args.bootstrap,
                ci_seed=args.ci_seed,
                images=found.images if found is not None else None,
                paired=args.paired,
            )
        )
    if not bench.empty:
        parts.append(render_bench(bench, args.format))
    if not parts:
        raise ZsadError(f"{', '.join(map(str, args.results))}: no evaluation or benchmark rows to tabulate")
    text = "\n".join(parts)
    if args.out:
        atomic_write_text(args.out, text)
    else:
        print(text, end="" if text.endswith("\n") else "\n")
    return 0
