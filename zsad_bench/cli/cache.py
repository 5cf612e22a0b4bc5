"""``zsad-bench cache info|clear|fill``: inspect, empty or fill the feature cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zsad_bench.errors import ZsadError
from zsad_bench.features import FeatureCache
from zsad_bench.paths import usable_folder
from zsad_bench.sweep.fill import add_fill_parser


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cache", help="inspect, clear or fill the feature cache")
    actions = parser.add_subparsers(dest="cache_action", metavar="ACTION", required=True)
    info = actions.add_parser("info", help="where the cache is, and what it holds")
    clear = actions.add_parser("clear", help="delete every cached feature entry")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    for p in (info, clear):
        p.add_argument(
            "--dir", type=Path, default=None, help="cache folder (default: $ZSAD_BENCH_CACHE or XDG cache)/features"
        )
    info.set_defaults(func=cmd_info)
    clear.set_defaults(func=cmd_clear)
    add_fill_parser(actions)


def _human(n: int) -> str:
    size, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"


def _cache(args: argparse.Namespace) -> FeatureCache:
    """The feature cache of ``--dir`` (or the default); a file in its place is a one-line error."""
    if args.dir is not None:
        usable_folder(args.dir.expanduser(), "--dir")
    return FeatureCache(args.dir)


def cmd_info(args: argparse.Namespace) -> int:
    """Print the cache root, totals and one line per (backbone, layers, dtype) group."""
    info = _cache(args).info()
    print(f"feature cache: {info['root']}")
    print(f"entries: {info['entries']}  size: {_human(info['bytes'])}")
    for g in info["groups"]:
        layers = ",".join(g["layers"])
        print(f"  {g['identity']}  layers={layers}  {g['dtype']}  {g['entries']} entries  {_human(g['bytes'])}")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    """Delete all cache groups (asks first unless ``--yes``)."""
    cache = _cache(args)
    info = cache.info()
    if not info["groups"]:
        print(f"feature cache {info['root']} is already empty")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise ZsadError(
                f"cache clear: would delete {info['entries']} entries ({_human(info['bytes'])}) in {info['root']}; "
                "re-run with --yes"
            )
        answer = input(f"delete {info['entries']} entries ({_human(info['bytes'])}) in {info['root']}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    removed = cache.clear()
    print(f"deleted {removed} entries ({_human(info['bytes'])}) from {info['root']}")
    return 0
