"""``zsad-bench run``: fit and evaluate a method on a protocol and write a results file."""

from __future__ import annotations

import argparse
from pathlib import Path

from zsad_bench.cli.common import add_run_arguments, parse_set, split_csv


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="fit + evaluate a method on a protocol, write a results file",
        description="Fit a method (on the auxiliary set, or on k normal images for few-shot methods), evaluate it on "
        "every target category and write results/runs/<id>.json (+ .csv). Re-running reuses cached features and "
        "fitted checkpoints.",
    )
    add_run_arguments(p)
    p.add_argument("--eval-size", type=int, help="resolution of pixel metrics (default: the input size S)")
    p.add_argument("--out", "-o", type=Path, help="results JSON path (default: results/runs/<run-id>.json)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run written to --out")
    p.add_argument("--label", help="column label in tables (default: the method's name)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument(
        "--aggregation",
        choices=("max", "mean", "lse"),
        help="image score from the map, for methods with this option (SPG): max, mean or log-sum-exp",
    )
    p.add_argument("--tau", type=float, help="temperature of --aggregation lse (SPG's agg_tau)")
    p.set_defaults(func=_run)


def spec_from_args(args: argparse.Namespace):
    """A RunSpec from the shared run options."""
    from zsad_bench.runner import RunSpec

    protocol = args.protocol if (args.protocol or args.target) else "synthetic"
    return RunSpec(
        method=args.method,
        backbone=args.backbone,
        protocol=protocol,
        aux=args.aux,
        targets=args.target,
        data_root=args.data_root,
        aux_categories=split_csv(args.aux_categories),
        categories=split_csv(args.categories),
        aux_split=args.aux_split,
        shots=args.shots,
        seeds=args.seed,
        method_config=parse_set(args.set),
        weights=args.weights,
        image_size=args.image_size,
        device=args.device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        progress=not args.quiet,
    )


def _run(args: argparse.Namespace) -> int:
    from zsad_bench.runner import run_experiment
    from zsad_bench.tables import load_results, render_summary

    spec = spec_from_args(args)
    if args.aggregation is not None:
        spec.method_config["aggregation"] = args.aggregation
    if args.tau is not None:
        spec.method_config["agg_tau"] = str(args.tau)
    spec.eval_size = args.eval_size
    spec.out = args.out
    spec.resume = args.resume
    spec.label = args.label
    spec.use_cache = not args.no_cache
    _, path = run_experiment(spec)
    print(render_summary(load_results([path]), "md"))
    print(f"\nresults written to {path}; every metric and a LaTeX version: zsad-bench table {path} [--format latex]")
    return 0
