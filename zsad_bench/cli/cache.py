"""``zsad-bench cache info|clear|fill``: inspect, empty or fill the feature cache (and, with ``clear --all``,
the other stores under the cache root)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from zsad_bench.errors import ZsadError
from zsad_bench.features import FeatureCache
from zsad_bench.paths import cache_dir, usable_folder
from zsad_bench.sweep.fill import add_fill_parser

# What else lives under the cache root besides features/ (never locks/: a running job may hold one).
STORES = {
    "checkpoints": "fitted detectors",
    "artifacts": "shared sub-fits (SPG's SAEs)",
    "validated": "dataset validation memos",
    "synthetic": "generated embedded datasets",
    "logs": "cache-fill logs",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cache", help="inspect, clear or fill the feature cache")
    actions = parser.add_subparsers(dest="cache_action", metavar="ACTION", required=True)
    info = actions.add_parser("info", help="where the cache is, and what it holds")
    clear = actions.add_parser("clear", help="delete every cached feature entry (--all: everything cached)")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    clear.add_argument(
        "--all",
        action="store_true",
        help="also delete the fitted checkpoints, SPG SAEs, validation memos, generated datasets and logs under "
        "the cache root ($ZSAD_BENCH_CACHE); not with --dir",
    )
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


def _stores() -> list[tuple[str, Path, int, int]]:
    """(name, folder, files, bytes) of each non-feature store present under the cache root."""
    found = []
    for name in STORES:
        folder = cache_dir() / name
        if folder.is_dir():
            files = [f for f in folder.rglob("*") if f.is_file()]
            found.append((name, folder, len(files), sum(f.stat().st_size for f in files)))
    return found


def cmd_info(args: argparse.Namespace) -> int:
    """Print the cache root, totals and one line per (backbone, layers, dtype) group, then the other stores."""
    info = _cache(args).info()
    print(f"feature cache: {info['root']}")
    print(f"entries: {info['entries']}  size: {_human(info['bytes'])}")
    for g in info["groups"]:
        layers = ",".join(g["layers"])
        print(f"  {g['identity']}  layers={layers}  {g['dtype']}  {g['entries']} entries  {_human(g['bytes'])}")
    if args.dir is None:
        for name, folder, n, size in _stores():
            print(f"{name}: {folder}  {n} files  {_human(size)}  ({STORES[name]})")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    """Delete all cache groups, with ``--all`` the other stores too (asks first unless ``--yes``)."""
    if args.all and args.dir is not None:
        raise ZsadError("cache clear: --all empties the whole cache root ($ZSAD_BENCH_CACHE); drop --dir")
    cache = _cache(args)
    info = cache.info()
    stores = _stores() if args.all else []
    total = info["bytes"] + sum(s[3] for s in stores)
    what = f"{info['entries']} feature entries" + "".join(f", {n} {name} files" for name, _, n, _ in stores)
    if not info["groups"] and not stores:
        print(f"feature cache {info['root']} is already empty")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise ZsadError(f"cache clear: would delete {what} ({_human(total)}) in {info['root']}; re-run with --yes")
        answer = input(f"delete {what} ({_human(total)}) in {info['root']}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    cache.clear()
    for _, folder, _, _ in stores:
        shutil.rmtree(folder)
    print(f"deleted {what} ({_human(total)}) from {info['root'] if not stores else cache_dir()}")
    return 0
