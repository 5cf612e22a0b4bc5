"""``zsad-bench cache fill``: extract one dataset's features into the cache, split into image shards.

The cache holds one entry per image, so shards are independent tasks: on ``--engine ray`` they spread
over the cluster's workers/GPUs, on ``--engine local`` over the visible devices. A shard already in
the cache costs only the reads that check it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from zsad_bench.cli.common import positive_int
from zsad_bench.errors import ZsadError
from zsad_bench.features import PRECISIONS
from zsad_bench.sweep import add_engine_arguments
from zsad_bench.sweep.engines import Task


def add_fill_parser(actions: argparse._SubParsersAction) -> None:
    """The ``cache fill`` action (registered by zsad_bench.cli.cache)."""
    p = actions.add_parser(
        "fill",
        help="extract a dataset's features into the cache (image shards over devices or a Ray cluster)",
        description="Compute and cache the features of every image of DATASET, in --shards parallel image shards.",
    )
    p.add_argument("dataset", metavar="DATASET", help="dataset spec, e.g. mvtec:/data/mvtec or synthetic:objects")
    p.add_argument("--backbone", "-b", required=True, help="backbone name (zsad-bench list backbones)")
    p.add_argument("--method", "-m", help="cache the layers (and paper image size) this method reads")
    p.add_argument("--image-size", type=positive_int, help="backbone input size S (default: the method's / backbone's)")
    p.add_argument("--weights", help="local weights file/dir for the backbone")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="the precision the runs that read these features use (part of the cache key; default: fp32)",
    )
    p.add_argument("--split", choices=("test", "train", "all"), default="all", help="images to cache (default: all)")
    p.add_argument("--categories", help="comma-separated categories (default: all)")
    p.add_argument("--shards", type=positive_int, help="image shards (default: one per worker)")
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="extraction batch size (default: 8, as `run` extracts)"
    )
    add_engine_arguments(p)
    p.set_defaults(func=cmd_fill)


def cmd_fill(args: argparse.Namespace) -> int:
    """Plan the shards, run them on the engine, print what was computed."""
    from zsad_bench.backbones import BACKBONES
    from zsad_bench.data import check_categories, open_dataset
    from zsad_bench.paths import cache_dir
    from zsad_bench.sweep import build_engine
    from zsad_bench.sweep.plan import _digest, feature_spec, shard_stages

    BACKBONES.get(args.backbone)  # an unknown name fails here, not once per shard
    ds = open_dataset(args.dataset)
    cats = [c for c in args.categories.split(",") if c] if args.categories else None
    check_categories([ds], cats, args.dataset)
    split = None if args.split == "all" else args.split
    units = [ds.select([c], split).samples for c in ds.categories if not cats or c in cats]
    samples = [s for u in units for s in u]
    if not samples:
        raise ZsadError(f"{args.dataset}: no {args.split} images to cache")
    feat = feature_spec(args.method, args.backbone, args.image_size, args.weights, args.precision)
    feat.update(dataset=args.dataset, batch_size=args.batch_size)
    engine, threads, gpus = build_engine(args, None, None)
    shards = args.shards or _workers(engine, threads, gpus)
    stages = shard_stages(_digest(feat), feat, units, shards)
    logs = cache_dir() / "logs" / "fill"
    common = {"kind": "fill", "threads": threads, "cache_dir": str(cache_dir())}
    tasks = [
        Task(s.id, {**s.payload, **common, "id": s.id, "log": str(logs / f"{s.id}.log")}, [], threads, gpus)
        for s in stages
    ]
    computed = cached = 0
    failed: list[str] = []
    for event in engine.run(tasks):
        if event[0] != "done":
            continue
        status = event[2]
        if status["status"] == "done":
            computed, cached = computed + status["computed"], cached + status["cached"]
        else:
            failed.append(f"{event[1]}: {status.get('reason')} (log: {logs / (event[1] + '.log')})")
    print(
        f"cache fill {args.dataset} with {args.backbone}: {len(samples)} images in {len(stages)} shard(s), "
        f"{computed} computed, {cached} already cached",
        file=sys.stdout,
    )
    for line in failed:
        print(f"  failed {line}", file=sys.stderr)
    return 1 if failed else 0


def _workers(engine: Any, threads: int, gpus: float) -> int:
    """Parallel slots of the engine: devices of a local engine, GPU or CPU slots of a Ray cluster."""
    if engine.name == "local":
        return len(engine.devices)
    res = engine.ray.cluster_resources()
    return max(1, int(res.get("GPU", 0) / gpus) if gpus else int(res.get("CPU", 1) // threads))
