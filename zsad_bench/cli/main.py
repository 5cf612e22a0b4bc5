"""``zsad-bench`` entry point: dispatches to the command modules and turns errors into one line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from zsad_bench import __version__
from zsad_bench.errors import ZsadError

# Each module defines ``add_parser(subparsers)`` and sets ``func`` on its parser(s).
COMMAND_MODULES = (
    "zsad_bench.cli.run",
    "zsad_bench.cli.listing",
    "zsad_bench.cli.data",
    "zsad_bench.cli.table",
    "zsad_bench.cli.bench",
    "zsad_bench.cli.cache",
    "zsad_bench.cli.spg",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zsad-bench",
        description="Benchmark harness for zero-shot anomaly detection and segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"zsad-bench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ZsadError as exc:
        print(f"zsad-bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zsad-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
