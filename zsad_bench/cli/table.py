"""``zsad-bench table``: per-category, main and speed tables from saved results files."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from zsad_bench.errors import ZsadError
from zsad_bench.metrics import METRICS
from zsad_bench.results import atomic_write_text
from zsad_bench.tables import FORMATS, canonical_protocol, load_reported, render, render_bench, scan_results


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "table",
        help="render result tables (Markdown, LaTeX, CSV) from results files",
        description=(
            "Per-category tables (rows: categories + Mean, columns: methods), a main table (protocols x "
            "metrics) and speed tables from results files or directories of them. Values in percent, best "
            "in bold. aupro (exact MVTec) and aupro_cflow (200 thresholds, rescaled) are separate metrics."
        ),
    )
    parser.add_argument("results", nargs="*", type=Path, help="results/benchmark JSON files or directories")
    parser.add_argument("--format", choices=FORMATS, default="md", help="output format (default: md)")
    parser.add_argument(
        "--with-reported",
        action="store_true",
        help="add the papers' reported figures (results/reported/*.csv) as '(reported)' columns",
    )
    parser.add_argument("--metric", nargs="+", choices=list(METRICS), metavar="M", help="only these metrics")
    parser.add_argument(
        "--columns",
        choices=("method", "backbone"),
        default="method",
        help="one column per method label (default) or per backbone",
    )
    parser.add_argument("--no-main", action="store_true", help="omit the main table")
    parser.add_argument("--out", type=Path, help="write to FILE instead of standard output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.results and not args.with_reported:
        raise ZsadError("table: give results files/directories (or --with-reported to show the papers' figures)")
    measured, bench = scan_results(args.results) if args.results else (pd.DataFrame(), pd.DataFrame())
    if args.format == "csv" and not measured.empty and not bench.empty:
        raise ZsadError("--format csv: evaluation and benchmark files have different columns; tabulate them separately")
    parts = []
    if args.with_reported:
        reported = load_reported()
        if not measured.empty:  # only the protocols that were measured
            wanted = set(measured["protocol"].map(canonical_protocol))
            reported = reported[reported["protocol"].isin(wanted)]
        measured = pd.concat([measured, reported], ignore_index=True) if not measured.empty else reported
    if not measured.empty:
        parts.append(render(measured, args.format, metrics=args.metric, columns=args.columns, main=not args.no_main))
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
