"""Cold vs warm feature extraction over realmini with effnet-lite0: the warm pass must hit the cache.

Run: ``python benchmarks/bench_cache.py [--realmini DIR] [--cache DIR] [--batch-size N] [--workers N]``.
The cache goes to a fresh temporary folder unless ``--cache`` is given.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from zsad_bench.backbones import create_backbone
from zsad_bench.data.records import Sample
from zsad_bench.features import FeatureCache, extract_features

DEFAULT_REALMINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realmini"
EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp"}


def realmini_samples(root: Path) -> list[Sample]:
    """Every image file under ``root`` (masks excluded) as a plain sample; no dataset adapter needed."""
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in EXTENSIONS and "ground_truth" not in p.parts and "Masks" not in p.parts
    )
    return [Sample(p, p.parent.name, 0, None, "good", "test") for p in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--realmini", type=Path, default=DEFAULT_REALMINI)
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: a fresh temporary one)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    args = parser.parse_args()
    samples = realmini_samples(args.realmini)
    if args.limit:
        samples = samples[: args.limit]
    backbone = create_backbone("effnet-lite0")
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(args.cache or Path(tmp))
        timings = []
        for run in ("cold", "warm"):
            start = time.perf_counter()
            store = extract_features(
                backbone, samples, cache=cache, batch_size=args.batch_size, num_workers=args.workers, progress=False
            )
            store.get(range(len(store)))
            timings.append(time.perf_counter() - start)
            print(f"{run}: {timings[-1]:.2f} s  hits={store.hits} misses={store.misses}  ({len(samples)} images)")
        info = cache.info()
        print(f"cache: {info['entries']} entries, {info['bytes'] / 2**20:.1f} MiB in {info['root']}")
        print(f"speed-up warm vs cold: {timings[0] / timings[1]:.1f}x")


if __name__ == "__main__":
    main()
