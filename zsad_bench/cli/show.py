"""``zsad-bench show``: qualitative grid (input | ground truth | anomaly map | overlay) of one category."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zsad_bench.cli.common import output_file
from zsad_bench.viz import NEEDS_MAPS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show",
        help="qualitative grid of one category: input | ground truth | map | overlay with the F1 contour",
        description="Draw n images of a category: input, ground truth, and for each results file its anomaly map "
        "and an overlay with the contour of the F1-optimal threshold (maximising pixel F1 over the category). "
        "Several results files are drawn side by side on the same images, on one colour scale (each run's maps "
        "scaled to its category range). Multi-seed runs are drawn with one seed (--seed; default: the first), "
        f"and the title says which. {NEEDS_MAPS}",
    )
    p.add_argument("results", nargs="+", type=Path, help="results JSON file(s) of `zsad-bench run`")
    p.add_argument("--category", "-c", required=True, help="target category to show")
    p.add_argument("--n", type=int, default=8, help="number of images (default: 8)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--worst", dest="mode", action="store_const", const="worst", help="worst-scored images (default)")
    mode.add_argument("--best", dest="mode", action="store_const", const="best", help="best-scored images")
    mode.add_argument("--random", dest="mode", action="store_const", const="random", help="a seeded random draw")
    p.add_argument(
        "--out", "-o", type=output_file, help="PNG path (default: <results>_<category>_<mode>.png beside it)"
    )
    p.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="which of the run's seeds to draw, maps and image scores (every results file must have it; default: "
        "each run's first seed)",
    )
    p.add_argument("--device", default="cpu", help="device for re-predicting runs without saved maps (default: cpu)")
    p.set_defaults(func=_show, mode="worst")


def _show(args: argparse.Namespace) -> int:
    from zsad_bench.errors import ZsadError
    from zsad_bench.viz.runs import load_runs, pick_seeds, seed_note
    from zsad_bench.viz.show import show_grid

    if args.n < 1:
        raise ZsadError(f"--n {args.n}: show at least 1 image")
    runs = load_runs(args.results)
    note = seed_note(runs, pick_seeds(runs, args.seed))
    first = runs[0].path
    out = args.out or first.with_name(f"{first.stem}_{args.category}_{args.mode}.png")
    if out.suffix.lower() != ".png":
        raise ZsadError(f"--out {out}: the grid is written as PNG; use a .png name")

    def log(msg: str) -> None:
        print(f"[zsad-bench] {msg}", file=sys.stderr)

    path, picked = show_grid(runs, args.category, out, args.n, args.mode, args.device, log=log, seed=args.seed)
    how = args.mode + (f", {note}" if note else "")
    print(f"{len(picked)} images of {args.category} ({how}) from {len(runs)} run(s): {path}")
    return 0
