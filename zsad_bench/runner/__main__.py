"""``python -m zsad_bench.runner PLAN --out RESULTS [--items 0,2,...]``: execute a shard of a saved plan."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zsad_bench.errors import ZsadError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zsad_bench.runner", description=__doc__)
    p.add_argument("plan", type=Path, help="plan JSON written by Plan.save")
    p.add_argument("--out", type=Path, required=True, help="results JSON shared by every shard of the plan")
    p.add_argument("--items", help="comma-separated item indices (default: every item not yet recorded)")
    args = p.parse_args(argv)
    from zsad_bench.runner import Plan, execute

    try:
        items = [int(i) for i in args.items.split(",") if i] if args.items else None
        execute(Plan.load(args.plan), args.out, items)
    except ValueError:
        print(f"zsad-bench: error: --items {args.items}: expected comma-separated integers", file=sys.stderr)
        return 2
    except ZsadError as exc:
        print(f"zsad-bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
