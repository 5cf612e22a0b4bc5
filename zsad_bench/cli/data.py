"""``zsad-bench data check DATASET`` and ``zsad-bench data synth OUT``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zsad_bench.data import open_dataset
from zsad_bench.data.check import check_dataset


def _categories(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _check(args: argparse.Namespace) -> int:
    ds = open_dataset(args.dataset, _categories(args.categories))
    report = check_dataset(ds, progress=_progress(args))
    print(report.render())
    return 0 if report.ok else 1


def _synth(args: argparse.Namespace) -> int:
    from zsad_bench.adapters.synthetic import generate_synthetic

    roots = generate_synthetic(Path(args.out), seed=args.seed, progress=_progress(args))
    for name, root in roots.items():
        print(f"{name}: folder:{root}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``data check`` and ``data synth``."""
    data = subparsers.add_parser("data", help="check datasets, generate the synthetic sets")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    check = sub.add_parser(
        "check",
        help="decode every image and mask of a dataset and report all problems",
        description="Open DATASET, decode every image and mask, print image counts and every problem found. "
        "Exit code 1 when there are errors (warnings alone give 0).",
    )
    check.add_argument("dataset", metavar="DATASET", help="dataset spec, e.g. mvtec:/data/mvtec_ad, visa:/data/VisA")
    check.add_argument("--categories", metavar="A,B", help="comma-separated categories to check (default: all)")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(func=_check)

    synth = sub.add_parser(
        "synth",
        help="write the synthetic textures and objects sets to a folder",
        description="Write OUT/textures and OUT/objects (MVTec AD layout, exact masks); open them with folder:OUT/...",
    )
    synth.add_argument("out", metavar="OUT", help="output folder (its textures/ and objects/ must not exist)")
    synth.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=_synth)
