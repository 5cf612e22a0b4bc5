"""The prepared GPU check of issue #13: SPG's paper protocol at full speed on one GPU, without any hub.

    python benchmarks/gpu_check.py --json $OUT/gpu_check.json   # a CUDA machine: < 5 min on an H100/H200
    python benchmarks/gpu_check.py --only protocol               # rerun one section
    python benchmarks/gpu_check.py --smoke                       # any machine, CPU, seconds (in the test suite)

It builds a random-weight DINOv3 ViT-L/16 of the real architecture (transformers config, no weights
needed), writes stand-ins of the test splits of MVTec AD (15 categories, 1,725 PNG images at their
real resolutions, 0/255 PNG masks) and VisA (12 categories, 2,162 JPEG images at their real
resolutions, the ``split_csv/1cls.csv`` layout, 0/1 PNG masks), then measures:

* the plain upstream forward (``DINOv3ViTModel``, bf16 weights) against ``zsad-bench``'s backbone
  forward and SPG's head at batch 1/8/32;
* one SPG SAE step and one guide step at the paper's sizes (fp32 and TF32);
* extraction from image files, decode included (bf16), against the plain forward at batch 32;
* the protocol end to end, VisA -> MVTec and MVTec -> VisA, cold cache, through the runner.

and prints one table with the targets of the issue beside the measurements. Each row is also printed
(and written to ``--json``) the moment it is measured, so a run stopped at a time limit keeps what it
measured; a section that fails prints its traceback, becomes a "FAILED" row, and the next section runs
(exit status 1). Needs torch and
transformers only (neither open_clip nor the effnet weights); the smoke mode swaps in a tiny DINOv3
config, a few small images and a tiny SPG, so it runs on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the device machine receives the repository, not an installed package
    sys.path.insert(0, str(ROOT))


def _register_plugins() -> None:
    """Import the plugins the check uses: without an installed distribution there are no entry points
    (and open_clip, which other plugins import, may be absent)."""
    import zsad_bench.adapters.mvtec
    import zsad_bench.adapters.visa
    import zsad_bench.methods.spg  # noqa: F401


# (category, test images, of which normal, width, height, grayscale) — MVTec AD's test split
MVTEC = [
    ("bottle", 83, 20, 900, 900, False),
    ("cable", 150, 58, 1024, 1024, False),
    ("capsule", 132, 23, 1000, 1000, False),
    ("carpet", 117, 28, 1024, 1024, False),
    ("grid", 78, 21, 1024, 1024, True),
    ("hazelnut", 110, 40, 1024, 1024, False),
    ("leather", 124, 32, 1024, 1024, False),
    ("metal_nut", 115, 22, 700, 700, False),
    ("pill", 167, 26, 800, 800, False),
    ("screw", 160, 41, 1024, 1024, True),
    ("tile", 117, 33, 840, 840, False),
    ("toothbrush", 42, 12, 1024, 1024, False),
    ("transistor", 100, 60, 1024, 1024, False),
    ("wood", 79, 19, 1024, 1024, False),
    ("zipper", 151, 32, 1024, 1024, True),
]
# VisA's 1cls test split
VISA = [
    ("candle", 200, 100, 1284, 1168),
    ("capsules", 160, 60, 1500, 1000),
    ("cashew", 150, 50, 1274, 1004),
    ("chewinggum", 150, 50, 1342, 1024),
    ("fryum", 150, 50, 1500, 1000),
    ("macaroni1", 200, 100, 1500, 1000),
    ("macaroni2", 200, 100, 1500, 1000),
    ("pcb1", 200, 100, 1404, 1000),
    ("pcb2", 200, 100, 1404, 1000),
    ("pcb3", 201, 101, 1404, 1000),
    ("pcb4", 201, 101, 1404, 1000),
    ("pipe_fryum", 150, 50, 1300, 1000),
]
DINOV3_L16 = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "patch_size": 16,
    "num_register_tokens": 4,
    "image_size": 224,
}


# ---------------------------------------------------------------------------------------------- data
def _picture(seed: int, width: int, height: int, gray: bool, anomalous: bool) -> tuple[Image.Image, Image.Image | None]:
    """A smooth textured picture (compresses like a photo, not like noise) and, if anomalous, a defect mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, ph = [*rng.uniform(0.005, 0.05, 2).tolist(), rng.uniform(0, 6.28)]
        img[..., c] = 128 + 60 * np.sin(fx * xx + ph) * np.cos(fy * yy)
    mask = None
    if anomalous:
        h, w = int(rng.integers(height // 16, height // 5)), int(rng.integers(width // 16, width // 5))
        r, c = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        img[r : r + h, c : c + w] = rng.uniform(0, 255, 3)
        mask = np.zeros((height, width), np.uint8)
        mask[r : r + h, c : c + w] = 1
    arr = img.clip(0, 255).astype(np.uint8)
    pic = Image.fromarray(arr[..., 0] if gray else arr)
    return pic, None if mask is None else Image.fromarray(mask)


def _write_one(job: tuple) -> None:
    path, mask_path, seed, width, height, gray, anomalous, mask_scale = job
    pic, mask = _picture(seed, width, height, gray, anomalous)
    path.parent.mkdir(parents=True, exist_ok=True)
    pic.save(path, quality=95) if path.suffix == ".JPG" else pic.save(path)
    if mask is not None:
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(mask) * mask_scale).save(mask_path)


def make_protocol_data(root: Path, smoke: bool, processes: int) -> tuple[int, int]:
    """MVTec-AD and VisA stand-ins under ``root/mvtec_ad`` and ``root/visa``; returns their image counts."""
    mvtec = [(c, 4, 2, 96, 80, g) for c, *_, g in MVTEC[:2]] if smoke else MVTEC
    visa = [(c, 4, 2, 120, 96) for c, *_ in VISA[:2]] if smoke else VISA
    jobs, rows, seed = [], ["object,split,label,image,mask"], 0
    for cat, n, normal, w, h, gray in mvtec:
        base = root / "mvtec_ad" / cat
        (base / "train" / "good").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            defect = "good" if i < normal else "defect"
            img = base / "test" / defect / f"{i:03d}.png"
            jobs.append((img, base / "ground_truth" / defect / f"{i:03d}_mask.png", seed, w, h, gray, i >= normal, 255))
            seed += 1
        # one normal train image per category (the adapter expects the folder; zero-shot runs do not read it)
        jobs.append((base / "train" / "good" / "000.png", None, seed, w, h, gray, False, 255))
        seed += 1
    for cat, n, normal, w, h in visa:
        for i in range(n):
            kind = "Normal" if i < normal else "Anomaly"
            rel = f"{cat}/Data/Images/{kind}/{i:03d}.JPG"
            mask_rel = f"{cat}/Data/Masks/Anomaly/{i:03d}.png" if i >= normal else ""
            rows.append(f"{cat},test,{'normal' if i < normal else 'anomaly'},{rel},{mask_rel}")
            jobs.append((root / "visa" / rel, root / "visa" / mask_rel, seed, w, h, False, i >= normal, 1))
            seed += 1
        rows.append(f"{cat},train,normal,{cat}/Data/Images/Normal/train000.JPG,")
        jobs.append((root / "visa" / f"{cat}/Data/Images/Normal/train000.JPG", None, seed, w, h, False, False, 1))
        seed += 1
    (root / "visa" / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "visa" / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    if processes > 1:
        with Pool(processes) as pool:
            pool.map(_write_one, jobs, chunksize=8)
    else:
        for job in jobs:
            _write_one(job)
    return sum(m[1] for m in mvtec), sum(v[1] for v in visa)


# ---------------------------------------------------------------------------------------------- checks
def _ms(fn: Any, device: Any, warmup: int, iters: int) -> float:
    from zsad_bench.bench import time_fn

    return 1e3 * statistics.median(time_fn(fn, device, warmup, iters))


def backbone_rows(backbone: Any, device: Any, batches: list[int], warmup: int, iters: int) -> list[tuple]:
    """Plain upstream bf16 forward vs the zsad-bench backbone forward and SPG's head, per batch size."""
    import torch

    from zsad_bench.bench import plain_forward
    from zsad_bench.detector import Batch, create_method
    from zsad_bench.features import precision_backbone
    from zsad_bench.methods._spg_sae import TopKSAE

    bf16 = precision_backbone(backbone, "bf16", device)
    plain = plain_forward(bf16)
    det = create_method("spg", backbone, device)
    gen = torch.Generator().manual_seed(0)
    det.sae = TopKSAE(backbone.embed_dim, det.config.sae_width, det.config.sae_k, gen).to(device).eval()
    det.dead_mask = torch.zeros(det.config.sae_width, dtype=torch.bool)
    det.coef = det.coef_ema = torch.rand(4, det.config.sae_width, generator=gen).to(device)
    rows = []
    s = backbone.image_size
    for bs in batches:
        x = torch.randn(bs, 3, s, s, generator=gen).to(device, torch.bfloat16)
        samples = [None] * bs
        with torch.inference_mode():
            up = _ms(lambda x=x: plain(x), device, warmup, iters)
            bb = _ms(lambda x=x: bf16.forward_features(x), device, warmup, iters)
            total = _ms(lambda x=x, s=samples: det.predict(Batch(s, bf16.forward_features(x))), device, warmup, iters)
        rows.append((f"plain upstream forward, bf16, batch {bs}", f"{1e3 * bs / up:.0f} img/s", ""))
        rows.append(
            (
                f"zsad-bench backbone, bf16, batch {bs}",
                f"{1e3 * bs / bb:.0f} img/s ({up / bb:.0%})",
                ">= 95% of plain" if bs >= 8 else "",
            )
        )
        rows.append((f"SPG head overhead, bf16, batch {bs}", f"{total / bb - 1:+.1%}", "<= 5%" if bs >= 8 else ""))
    return rows


def fit_rows(device: Any, smoke: bool) -> list[tuple]:
    from zsad_bench.bench import spg_fit_figures
    from zsad_bench.methods._spg_sae import dense_auxk

    size = "tiny" if smoke else "paper"
    iters = 3 if smoke else 20
    rows = []
    for precision in ("fp32", "tf32"):
        fig = spg_fit_figures(device, size, warmup=1 if smoke else 5, iters=iters, precision=precision)
        used = "dense" if dense_auxk(device) else "sparse"
        other = "sparse" if used == "dense" else "dense"
        rows.append(
            (
                f"SPG SAE step ({size} sizes), {precision}",
                f"{fig['sae_step_ms']:.2f} ms ({used} AuxK decode; {other}: {fig[f'sae_step_ms_auxk_{other}']:.2f} ms)",
                "<= 8 ms" if precision == "fp32" else "",
            )
        )
        rows.append(
            (
                f"SPG guide step ({size} sizes), {precision}",
                f"{fig['guide_step_ms']:.2f} ms",
                "<= 2 ms" if precision == "fp32" else "",
            )
        )
    return rows


def extraction_rows(backbone: Any, files: list[Path], device: Any, batch: int, warmup: int, iters: int) -> list[tuple]:
    """Extraction from JPEG files (decode included, bf16) against the plain bf16 forward at ``batch``."""
    import torch

    from zsad_bench.bench import extraction_figure, plain_forward
    from zsad_bench.data.records import Sample
    from zsad_bench.features import precision_backbone

    samples = [Sample(f, "x", 0, None, "good", "test") for f in files]
    bf16 = precision_backbone(backbone, "bf16", device)
    plain = plain_forward(bf16)
    x = torch.randn(batch, 3, backbone.image_size, backbone.image_size).to(device, torch.bfloat16)
    with torch.inference_mode():
        up = batch / (_ms(lambda: plain(x), device, warmup, iters) / 1e3)
    extraction_figure(backbone, samples[:batch], backbone.default_layers, batch, "bf16", device)  # warm-up
    secs, _ = extraction_figure(backbone, samples, backbone.default_layers, batch, "bf16", device)
    rate = len(samples) / secs
    return [
        (
            f"extraction from {len(samples)} JPEG files, bf16, batch {batch}, decode included",
            f"{rate:.0f} img/s ({rate / up:.0%} of plain {up:.0f})",
            ">= 90% of plain",
        )
    ]


def protocol_rows(root: Path, config: Any, device: str, smoke: bool) -> list[tuple]:
    """Both cross-dataset directions through the runner, cold cache (a fresh ZSAD_BENCH_CACHE)."""
    from zsad_bench.runner import RunSpec, run_experiment

    os.environ["ZSAD_BENCH_CACHE"] = str(root / "cache")
    method_config: dict[str, Any] = {}
    if smoke:
        method_config = {"sae_width": 64, "sae_k": 4, "sae_epochs": 1, "guide_epochs": 1, "auxk": 8}
    rows = []
    t_all = time.perf_counter()
    for protocol in ("visa-to-mvtec", "mvtec-to-visa"):
        t0 = time.perf_counter()
        spec = RunSpec(
            method="spg",
            backbone="dinov3",
            protocol=protocol,
            data_root=root,
            method_config=method_config,
            backbone_kwargs={"config": config},
            image_size=64 if smoke else 448,
            device=device,
            batch_size=8 if smoke else 32,
            out=root / "results" / f"{protocol}.json",
            precision="fp32",
            progress=False,
        )
        result, _ = run_experiment(spec)
        total = time.perf_counter() - t0
        means = [r.metrics.get("image_auroc", float("nan")) for r in result.records]
        fit = sum(f.seconds for f in result.fits)
        items = sum(r.seconds for r in result.records)  # the first item's time includes the fit it waited for
        rows.append(
            (
                f"protocol {protocol} (fit + {len(result.records)} categories)",
                f"{total:.1f} s: SAE + guides {fit:.1f} s, feature extraction + scoring {items - fit:.1f} s, setup "
                f"{total - items:.1f} s; mean image AUROC {np.nanmean(means):.3f} (random weights)",
                "",
            )
        )
    rows.append(
        (
            "protocol stand-in, both directions, cold cache",
            f"{time.perf_counter() - t_all:.1f} s",
            "<= 180 s on one H200",
        )
    )
    return rows


SECTIONS = ("backbone", "fit", "extraction", "protocol")


class Report:
    """The table's rows, each printed the moment it is measured (a run killed at its time limit keeps
    what it measured) and, with ``json_path``, rewritten to that file after every row."""

    def __init__(self, json_path: Path | None) -> None:
        self.rows: list[tuple[str, str, str]] = []
        self.failed: list[str] = []
        self.json_path = json_path

    def add(self, rows: list[tuple[str, str, str]]) -> None:
        for row in rows:
            self.rows.append(row)
            print(f"gpu_check: {row[0]}: {row[1]}" + (f"  [target {row[2]}]" if row[2] else ""), flush=True)
        if self.json_path is not None:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            keys = ("what", "measured", "target")
            doc = {"rows": [dict(zip(keys, r, strict=True)) for r in self.rows], "failed": self.failed}
            self.json_path.write_text(json.dumps(doc, indent=1) + "\n")

    def section(self, name: str, fn: Any) -> None:
        """Run one section; a failure becomes a row (its traceback on stderr) and the next section runs."""
        try:
            self.add(fn())
        except Exception as exc:
            traceback.print_exc()
            self.failed.append(name)
            self.add([(f"{name} section FAILED", f"{type(exc).__name__}: {exc}", "")])


def render(rows: list[tuple[str, str, str]]) -> str:
    header = ("what", "measured", "target")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(3)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join([line, rule, *body])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model and data on the CPU, in seconds")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument(
        "--root", type=Path, help="where to write the stand-in data and the cold cache (default: a temp dir)"
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="run these sections only (to rerun one that failed); default: all",
    )
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file (rewritten after every row)")
    args = p.parse_args(argv)

    import torch

    _register_plugins()
    from zsad_bench.backbones import create_backbone
    from zsad_bench.features import set_deterministic

    device_name = args.device or ("cpu" if args.smoke else "cuda")
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device; run with --smoke on a CPU", file=sys.stderr)
        return 2
    device = torch.device(device_name)
    set_deterministic(False)
    if args.smoke:
        from zsad_bench.backbones.testing import tiny_config

        config = tiny_config("dinov3")
        size, batches, warmup, iters = 64, [1, 2], 1, 2
    else:
        from transformers import DINOv3ViTConfig

        config = DINOv3ViTConfig(**DINOV3_L16)
        size, batches, warmup, iters = 448, [1, 8, 32], 3, 10
    t0 = time.perf_counter()
    report = Report(args.json)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report.add([("device", f"{name}, torch {torch.__version__}", "")])
    with tempfile.TemporaryDirectory(prefix="zsad-gpu-check-") as tmp:
        root = args.root or Path(tmp)
        n_mvtec, n_visa = make_protocol_data(root, args.smoke, 1 if args.smoke else min(16, os.cpu_count() or 1))
        report.add(
            [
                (
                    "stand-in data written",
                    f"MVTec AD {n_mvtec} + VisA {n_visa} test images, {time.perf_counter() - t0:.0f} s",
                    "1,725 + 2,162" if not args.smoke else "",
                )
            ]
        )
        torch.manual_seed(0)  # the random weights: the same model on every run
        backbone = create_backbone("dinov3", config=config, image_size=size).to(device).eval()
        files = sorted((root / "visa").glob("*/Data/Images/*/*.JPG"))[: (4 if args.smoke else 512)]
        sections = {
            "backbone": lambda: backbone_rows(backbone, device, batches, warmup, iters),
            "fit": lambda: fit_rows(device, args.smoke),
            "extraction": lambda: extraction_rows(backbone, files, device, batches[-1], warmup, iters),
            "protocol": lambda: protocol_rows(root, config, device_name, args.smoke),
        }
        for section in SECTIONS:
            if section in args.only:
                report.section(section, sections[section])
    report.add([("gpu_check wall time", f"{time.perf_counter() - t0:.0f} s", "< 300 s")])
    print(render(report.rows), flush=True)
    if report.failed:
        print(f"gpu_check: failed sections: {', '.join(report.failed)} (tracebacks above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
