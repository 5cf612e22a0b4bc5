"""``zsad-bench sweep GRID.toml``: run a grid of points (methods x backbones x protocols x seeds x options)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zsad_bench.cli.common import output_folder
from zsad_bench.errors import ZsadError
from zsad_bench.paths import output_problem
from zsad_bench.sweep import add_engine_arguments
from zsad_bench.sweep.plan import Plan


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a grid of runs from a TOML file (local devices or a Ray cluster)",
        description="Expand GRID.toml ([base] run options, [grid] axes, [[exclude]] rules, [sweep] settings) into "
        "points, extract shared features once, fit shared stages (SPG's SAE) once, then run the points. One results "
        "file per point plus _sweep/manifest.json and _sweep/logs/ in the sweep directory; re-running skips finished "
        "points and resumes interrupted ones. Render with: zsad-bench table DIR.",
    )
    p.add_argument("grid", type=Path, metavar="GRID.toml", help="grid file (see README, section Sweeps)")
    p.add_argument(
        "--out-dir",
        "-o",
        type=output_folder,
        help="sweep directory (default: [sweep] out_dir, else results/sweeps/<grid name>)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="list the points and stages and whether each is done, cached or to run"
    )
    add_engine_arguments(p)
    p.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    from zsad_bench.sweep.plan import load_grid, make_plan, points_of

    grid = load_grid(args.grid)
    out_dir = args.out_dir or grid.out_dir or Path("results") / "sweeps" / args.grid.stem
    plan = make_plan(points_of(grid), grid.fill_shard)
    return execute(plan, out_dir, args, grid.threads, grid.gpus_per_point, str(args.grid))


def execute(
    plan: Plan, out_dir: Path, args: argparse.Namespace, threads: int | None, gpus: float | None, source: str
) -> int:
    """Dry-run listing, or run the plan and print the failures; 1 when a point failed."""
    from zsad_bench.sweep.driver import Options, describe, run_sweep

    if args.dry_run:
        print(describe(out_dir, plan))
        return 0
    problem = output_problem(Path(out_dir), folder=True)
    if problem:
        raise ZsadError(f"{out_dir}: cannot be the sweep directory: {problem} (set it with --out-dir)")
    from zsad_bench.sweep import build_engine

    engine, threads, gpus = build_engine(args, threads, gpus)
    outcome = run_sweep(out_dir, plan, engine, Options(threads, gpus), source, sys.stderr)
    total = len(plan.points)
    print(
        f"{total - len(outcome.failed)}/{total} points complete in {out_dir}; render with: zsad-bench table {out_dir}"
    )
    return 1 if outcome.failed else 0
