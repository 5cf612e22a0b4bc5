"""``zsad-bench run``: fit and evaluate a method on a protocol and write a results file."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zsad_bench.cli.common import add_run_arguments, parse_set, positive_int, split_csv
from zsad_bench.errors import ZsadError
from zsad_bench.viz import NEEDS_MAPS


class SetAlias(argparse.Action):
    """``--NAME VALUE`` as a documented alias of ``--set OPTION=VALUE`` (validated by the method's Config)."""

    def __init__(self, option_strings: list[str], dest: str, option: str, **kwargs: Any) -> None:
        super().__init__(option_strings, "set", **kwargs)
        self.option = option

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        items = list(getattr(namespace, "set", None) or [])
        namespace.set = [*items, f"{self.option}={values}"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="fit + evaluate a method on a protocol, write a results file",
        description="Fit a method (on the auxiliary set, or on k normal images for few-shot methods), evaluate it on "
        "every target category and write results/runs/<id>.json (+ .csv). Re-running reuses cached features and "
        "fitted checkpoints.",
    )
    add_run_arguments(p, method_required=False)  # --method may come from --config
    p.add_argument("--eval-size", type=positive_int, help="resolution of pixel metrics (default: the input size S)")
    p.add_argument("--out", "-o", type=Path, help="results JSON path (default: results/runs/<run-id>.json)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run written to --out")
    p.add_argument("--label", help="column label in tables (default: the method's name)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument(
        "--aggregation",
        action=SetAlias,
        option="aggregation",
        metavar="NAME",
        help="alias of --set aggregation=NAME (SPG: image score from the map: max, mean or lse)",
    )
    p.add_argument("--tau", action=SetAlias, option="agg_tau", metavar="T", help="alias of --set agg_tau=T")
    p.add_argument(
        "--save-maps",
        type=int,
        nargs="?",
        const=256,
        metavar="SIZE",
        help="also save the anomaly maps (fp16, compressed, SIZE x SIZE, default 256) in <results>.maps/; the size "
        f"is printed first. {NEEDS_MAPS}",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE.toml",
        help="run options from a TOML file (keys: these options' names, e.g. method, backbone, set.sigma); "
        "an option given on the command line wins whatever its value, --set/--aggregation/--tau per method option",
    )
    p.set_defaults(func=_run)


def _standalone() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """``(top, run)``: a fresh top-level parser holding only the ``run`` command, and that command's parser."""
    parser = argparse.ArgumentParser(add_help=False)
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    return parser, sub.choices["run"]


def run_actions() -> dict[str, argparse.Action]:
    """The ``run`` command's options by dest: the vocabulary of run config files and sweep grids.

    ``--aggregation`` / ``--tau`` are aliases of ``--set`` (dest "set"): a config file writes ``set.aggregation``.
    """
    actions = _standalone()[1]._actions
    return {a.dest: a for a in actions if a.dest not in ("help", "config", "func") and not isinstance(a, SetAlias)}


def given_options(argv: Sequence[str]) -> set[str]:
    """Dests of the options given in ``argv`` (``["run", ...]``, as ``main`` parsed it), whatever their value.

    Re-parses with every default suppressed, so only the options on the command line reach the namespace;
    ``--aggregation`` / ``--tau`` count as ``set``.
    """
    parser, run = _standalone()
    for action in run._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command", "func"}


def spec_from_args(args: argparse.Namespace):
    """A RunSpec from the run command's options (also used by sweeps, with every option present)."""
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
        preset=args.preset,
        weights=args.weights,
        image_size=args.image_size,
        eval_size=args.eval_size,
        device=args.device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        precision=args.precision,
        deterministic=args.deterministic,
        out=args.out,
        resume=args.resume,
        label=args.label,
        progress=not args.quiet,
        use_cache=not args.no_cache,
        save_maps=args.save_maps,
    )


def _run(args: argparse.Namespace) -> int:
    from zsad_bench.runner import run_experiment
    from zsad_bench.tables import load_results, render_summary

    if args.config:
        from zsad_bench.sweep.config import apply_run_config

        apply_run_config(args, args.config, run_actions(), given_options(args.argv))
    elif not args.method:
        raise ZsadError("--method is required (or method = ... in a --config file); see zsad-bench list methods")
    result, path = run_experiment(spec_from_args(args))
    print(render_summary(load_results([path]), "md"))
    print(f"\nresults written to {path}; every metric and a LaTeX version: zsad-bench table {path} [--format latex]")
    print(f"look at them: zsad-bench show {path} --category {result.records[0].category}   (overlay grid, PNG)")
    print(f"              zsad-bench plot {path}   (curves, bars, histograms: PNG + PDF)")
    print(f"              zsad-bench report {path} -o {path.with_suffix('.html')}   (one HTML file, opens offline)")
    return 0
