"""``zsad-bench bench``: inference throughput/latency of a method beside its backbone alone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zsad_bench.cli.common import device_name, non_negative_int, output_file, parse_set, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time a method's inference against its backbone alone",
        description="Throughput (images/s), p50/p95 latency per image and peak memory for the backbone alone, the "
        "method on cached features, and both together, per batch size and dtype. The method is fitted quickly on "
        "synthetic data unless --run gives a finished run to take the fitted checkpoint from.",
    )
    p.add_argument("--method", "-m", required=True)
    p.add_argument("--backbone", "-b")
    p.add_argument("--weights")
    p.add_argument("--image-size", type=positive_int)
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 8, 32])
    p.add_argument("--dtype", nargs="+", default=["fp32"], help="fp32, bf16 (bf16 weights), fp16 (autocast)")
    p.add_argument(
        "--extraction-images",
        type=non_negative_int,
        default=32,
        help="images decoded and extracted per extraction row (0: no extraction rows; default 32)",
    )
    p.add_argument(
        "--fit-size",
        choices=("paper", "small", "none"),
        default="none",
        help="SPG: time one SAE and one guide step on synthetic tokens at the paper's sizes or small ones",
    )
    p.add_argument("--device", type=device_name, default="auto")
    p.add_argument("--warmup", type=non_negative_int, default=3)
    p.add_argument("--iters", type=positive_int, default=10)
    p.add_argument("--run", type=Path, help="results JSON of a finished run whose fitted checkpoint to time")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a method option")
    p.add_argument("--out", "-o", type=output_file, help="bench results JSON (default: results/bench/<id>.json)")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from zsad_bench.bench import BenchSpec, default_bench_path, run_bench
    from zsad_bench.results import atomic_write_text
    from zsad_bench.tables import render_bench

    spec = BenchSpec(
        method=args.method,
        backbone=args.backbone,
        batch_sizes=args.batch_sizes,
        dtypes=args.dtype,
        device=args.device,
        warmup=args.warmup,
        iters=args.iters,
        method_config=parse_set(args.set),
        weights=args.weights,
        image_size=args.image_size,
        run=args.run,
        progress=not args.quiet,
        extraction_images=args.extraction_images,
        fit_size=None if args.fit_size == "none" else args.fit_size,
    )
    doc = run_bench(spec)
    out = args.out or default_bench_path(doc)
    atomic_write_text(out, json.dumps(doc, indent=2) + "\n")
    print(render_bench([doc], "md"))
    if doc.get("fit"):
        fit = doc["fit"]
        print(
            f"\nSPG fit steps ({fit['size']} sizes): SAE {fit['sae_step_ms']:.2f} ms/step "
            f"(AuxK decode sparse {fit['sae_step_ms_auxk_sparse']:.2f}, dense {fit['sae_step_ms_auxk_dense']:.2f}), "
            f"guides {fit['guide_step_ms']:.2f} ms/step, peak {fit['peak_mem_mb']:.0f} MB"
        )
    print(f"\nbench results written to {out}")
    return 0
