"""Inference throughput and latency of a method against its backbone alone (``zsad-bench bench``).

For each dtype and batch size the plain upstream forward (the backbone library's own model, no
wrapper), the backbone forward, the method's own work on top of it, the total, and the extraction
pipeline (decode included, from image files) are timed after a warm-up, with CUDA synchronisation
around every iteration on GPU. ``bf16`` runs bf16 weights (as ``--precision bf16``), ``fp16`` autocast.
Peak memory is per row: the CUDA peak is reset before each component, and on the CPU the process's
peak resident set is reset (Linux ``/proc/self/clear_refs``) and reported above the level before the
component. For SPG, a fit figure times one SAE and one guide step on synthetic tokens (the paper's
sizes with ``fit_size="paper"``). The results file (schema ``zsad-bench/bench/v1``) renders with
``zsad-bench table``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import math
import resource
import secrets
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zsad_bench.data.io import load_image
from zsad_bench.detector import Batch, LearningType
from zsad_bench.errors import ZsadError
from zsad_bench.features import extract_features, precision_backbone, precision_context
from zsad_bench.provenance import device_description, git_commit, package_versions
from zsad_bench.results import BENCH_SCHEMA
from zsad_bench.runner import RunSpec, Session, load_fitted, open_datasets

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchSpec:
    method: str
    backbone: str | None = None
    batch_sizes: Sequence[int] = (1, 8, 32)
    dtypes: Sequence[str] = ("fp32",)
    device: str = "auto"
    warmup: int = 3
    iters: int = 10
    method_config: dict[str, Any] = field(default_factory=dict)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    image_size: int | None = None
    run: Path | None = None
    fit_images: int = 16
    progress: bool = True
    extraction_images: int = 32  # images per extraction figure (0: none)
    fit_size: str | None = None  # SPG fit-step figure at FIT_SIZES[fit_size] ("paper", "small"), None: none


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call of ``fn`` over ``iters`` calls after ``warmup`` calls (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _status_mb(field_name: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in MiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of one component: CUDA peak allocated since :meth:`start`, or on the CPU the peak
    resident set since :meth:`start` minus the resident set at :meth:`start` (process-wide counters,
    reset per component; without ``/proc`` the process's lifetime peak, as ``ru_maxrss``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = 0.0
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            self.base = _status_mb("VmRSS") or 0.0
        except OSError:
            self.base = 0.0

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = _status_mb("VmHWM")
        if hwm is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return max(hwm - self.base, 0.0)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> tuple[list[float], float]:
    """:func:`time_fn` and the component's peak memory (MiB) over the warm-up and the timed calls."""
    mem = PeakMemory(device)
    mem.start()
    times = time_fn(fn, device, warmup, iters)
    return times, mem.peak_mb()


def _row(
    spec: BenchSpec, device: torch.device, dtype: str, bs: int, component: str, times: list[float], peak_mb: float
) -> dict:
    per_image_ms = [1000 * t / bs for t in times]
    return {
        "method": spec.method,
        "backbone": spec.backbone,
        "device": device_description(device),
        "dtype": dtype,
        "batch_size": bs,
        "component": component,
        "images_per_s": bs / statistics.fmean(times),
        "p50_ms": float(np.percentile(per_image_ms, 50)),
        "p95_ms": float(np.percentile(per_image_ms, 95)),
        "peak_mem_mb": peak_mb,
    }


def fitted_runner(spec: BenchSpec) -> Session:
    """A Session whose detector is fitted: from ``spec.run``'s checkpoint, or quickly on synthetic data."""
    if spec.run is not None:
        return load_fitted(spec.run, backbone_kwargs=spec.backbone_kwargs, device=spec.device)[0]
    run_spec = RunSpec(
        method=spec.method,
        backbone=spec.backbone,
        protocol="synthetic",
        method_config=spec.method_config,
        backbone_kwargs=spec.backbone_kwargs,
        weights=spec.weights,
        image_size=spec.image_size,
        device=spec.device,
        progress=spec.progress,
    )
    runner = Session(run_spec)
    lt = runner.cls.learning_type
    if lt is LearningType.ZERO_SHOT:
        aux = open_datasets(("synthetic:textures",), None, "test", "auxiliary").samples
        normals = [s for s in aux if s.label == 0][: spec.fit_images // 2]
        anomalies = [s for s in aux if s.label == 1][: spec.fit_images - len(normals)]
        runner.fit(normals + anomalies, seed=111)
    elif lt is LearningType.FEW_SHOT:
        ds = open_datasets(("synthetic:objects",), None, "train", "target")
        runner.fit(ds.select([ds.categories[0]]).samples[:1], seed=111)
    return runner


def plain_forward(backbone: Any) -> Callable[[torch.Tensor], object] | None:
    """The backbone library's own forward of the wrapped model (no layer selection, no reshaping)."""
    model = getattr(backbone, "model", None)
    if model is None:
        return None
    if hasattr(model, "config") and hasattr(model.config, "patch_size"):  # transformers
        return lambda x: model(pixel_values=x)
    if hasattr(model, "visual"):  # open_clip
        return lambda x: model.visual(x)
    if hasattr(model, "forward_features"):  # timm
        return lambda x: model.forward_features(x)
    return None


def extraction_figure(
    backbone: Any,
    samples: Sequence[Any],
    layers: Sequence[str],
    batch_size: int,
    precision: str,
    device: torch.device,
    num_workers: int | None = None,
) -> tuple[float, float]:
    """Seconds and peak MiB of :func:`extract_features` over ``samples`` (image files: decode included),
    in memory (no cache: every image is computed)."""
    mem = PeakMemory(device)
    mem.start()
    _sync(device)
    t0 = time.perf_counter()
    extract_features(
        backbone, samples, layers, None, batch_size, num_workers, device, progress=False, precision=precision
    )
    _sync(device)
    return time.perf_counter() - t0, mem.peak_mb()


FIT_SIZES = {
    # images per step, tokens per image, token width, SAE width, k, AuxK k, mask size: the paper (DINOv3-L@448)
    "paper": {
        "sae_batch": 16,
        "guide_batch": 8,
        "tokens": 784,
        "dim": 1024,
        "width": 4096,
        "k": 32,
        "auxk": 512,
        "size": 448,
    },
    "small": {
        "sae_batch": 4,
        "guide_batch": 2,
        "tokens": 196,
        "dim": 128,
        "width": 512,
        "k": 16,
        "auxk": 64,
        "size": 112,
    },
    "tiny": {"sae_batch": 2, "guide_batch": 2, "tokens": 64, "dim": 32, "width": 64, "k": 4, "auxk": 8, "size": 32},
}


def spg_fit_figures(
    device: torch.device, size: str = "paper", warmup: int = 2, iters: int = 5, precision: str = "fp32"
) -> dict[str, float]:
    """Milliseconds per SPG SAE step (with AuxK active) and per guide step on synthetic tokens of ``size``
    (:data:`FIT_SIZES`), as the fit runs them (device-resident batches, fused Adam on CUDA).

    ``sae_step_ms`` is the step with the AuxK decode the fit uses on ``device`` (dense on CUDA, sparse
    elsewhere); ``sae_step_ms_auxk_sparse`` / ``_dense`` time both forms (the same numbers to float
    rounding), so a new device's figures say which one it should use."""
    from zsad_bench.methods._spg_sae import EMA, DeadLatentTracker, TopKSAE, dense_auxk
    from zsad_bench.methods.spg import SPG, _adam

    z = FIT_SIZES[size]
    grid = math.isqrt(z["tokens"])
    gen = torch.Generator().manual_seed(0)
    cfg = {"sae_width": z["width"], "sae_k": z["k"], "auxk": z["auxk"], "dead_window_tokens": 1}
    det = SPG.__new__(SPG)
    det.config = SPG.Config(**cfg)
    with precision_context(precision):
        x = torch.randn(z["sae_batch"], z["tokens"], z["dim"], generator=gen).to(device)
        sae = TopKSAE(z["dim"], z["width"], z["k"], gen).to(device)
        opt = _adam(list(sae.parameters()), 1e-3, (0.5, 0.999), device)
        tracker = DeadLatentTracker(z["width"], 1, 1e-3, device)  # window 1 token: AuxK always on
        sae_ms = {
            form: 1e3
            * statistics.median(
                time_fn(lambda d=form == "dense": det._sae_step(sae, opt, tracker, x, d), device, warmup, iters)
            )
            for form in ("sparse", "dense")
        }
        xg = torch.randn(z["guide_batch"], grid * grid, z["dim"], generator=gen).to(device)
        gg = torch.randn(z["guide_batch"], z["dim"], generator=gen).to(device)
        y = (torch.rand(z["guide_batch"], z["size"], z["size"], generator=gen) > 0.9).float().to(device)
        labels = torch.arange(z["guide_batch"], device=device) % 2
        raw = torch.full((4, z["width"]), 0.1, device=device, requires_grad=True)
        gopt = _adam([raw], 0.01, (0.5, 0.999), device)
        ema, atoms = EMA(0.999), sae.atoms().detach()
        alive = torch.ones(z["width"], dtype=torch.bool, device=device)
        batch = (xg, gg, y, labels)
        guide_ms = 1e3 * statistics.median(
            time_fn(lambda: det._guide_step(raw, gopt, ema, atoms, alive, batch, grid, grid), device, warmup, iters)
        )
    used = "dense" if dense_auxk(device) else "sparse"
    return {
        "sae_step_ms": sae_ms[used],
        "sae_step_ms_auxk_sparse": sae_ms["sparse"],
        "sae_step_ms_auxk_dense": sae_ms["dense"],
        "guide_step_ms": guide_ms,
    }


def _load_batch(backbone: Any, samples: Sequence[Any], n: int) -> torch.Tensor:
    return torch.stack([backbone.preprocess(load_image(s.image_path)) for s in samples[:n]])


def run_bench(spec: BenchSpec) -> dict[str, Any]:
    """Time upstream, backbone, method, total and extraction for every dtype x batch size (and SPG's fit
    steps); returns the results document."""
    for d in spec.dtypes:
        if d not in DTYPES:
            raise ZsadError(f"--dtype {d}: choose from {', '.join(DTYPES)}")
    runner = fitted_runner(spec)
    spec.backbone = runner.resolved.backbone_name
    device, detector = runner.device, runner.detector
    samples = open_datasets(("synthetic:objects",), None, "test", "target").samples
    images = _load_batch(runner.backbone, samples, max(spec.batch_sizes))
    layers = runner.layers  # what a run extracts for this method (preset-resolved)
    rows = []
    for dtype in spec.dtypes:
        backbone = precision_backbone(runner.backbone, "bf16", device) if dtype == "bf16" else runner.backbone
        in_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        autocast = torch.autocast(device.type, dtype=DTYPES[dtype]) if dtype == "fp16" else contextlib.nullcontext()
        upstream = plain_forward(backbone)
        for bs in spec.batch_sizes:
            reps = -(-bs // len(images))
            x = images.repeat(reps, 1, 1, 1)[:bs].to(device, in_dtype)
            if device.type == "cuda" and getattr(backbone, "channels_last", False):
                x = x.contiguous(memory_format=torch.channels_last)
            batch_samples = (samples * reps)[:bs]
            measured: dict[str, tuple[list[float], float]] = {}
            with torch.inference_mode(), autocast:
                feats = backbone.forward_features(x, layers)

                def backbone_fn(x=x, bb=backbone):
                    return bb.forward_features(x, layers)

                if upstream is not None:
                    measured["upstream"] = timed(functools.partial(upstream, x), device, spec.warmup, spec.iters)
                measured["backbone"] = timed(backbone_fn, device, spec.warmup, spec.iters)
                if runner.cls.needs_images:

                    def total_fn(x=x, s=batch_samples):
                        return detector.predict(Batch(s, None, images=x))

                else:

                    def method_fn(f=feats, s=batch_samples):
                        return detector.predict(Batch(s, f))

                    def total_fn(x=x, s=batch_samples):
                        return detector.predict(Batch(s, backbone_fn(x)))

                    measured["method"] = timed(method_fn, device, spec.warmup, spec.iters)
                measured["total"] = timed(total_fn, device, spec.warmup, spec.iters)
            for component, (times, peak) in measured.items():
                rows.append(_row(spec, device, dtype, bs, component, times, peak))
            rows[-1]["overhead_vs_backbone"] = (
                statistics.fmean(measured["total"][0]) / statistics.fmean(measured["backbone"][0]) - 1.0
            )
            if spec.extraction_images and not runner.cls.needs_images and dtype != "fp16":
                n = max(spec.extraction_images, bs)
                files = (samples * -(-n // len(samples)))[:n]
                precision = "bf16" if dtype == "bf16" else "fp32"
                secs, peak = extraction_figure(runner.backbone, files, layers, bs, precision, device)
                row = _row(spec, device, dtype, bs, "extraction", [secs / n * bs], peak)
                rows.append(row)
    fit = None
    if spec.fit_size and runner.cls.name in ("spg", "spg-topk"):
        mem = PeakMemory(device)
        mem.start()
        fit = spg_fit_figures(device, spec.fit_size, warmup=1, iters=max(2, min(spec.iters, 5)))
        fit.update(size=spec.fit_size, peak_mem_mb=mem.peak_mb())
    return {
        "schema": BENCH_SCHEMA,
        "kind": "bench",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "method": spec.method,
        "backbone": spec.backbone,
        "config": runner.method_config,
        "warmup": spec.warmup,
        "iters": spec.iters,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "rows": rows,
        "fit": fit,
    }


def default_bench_path(doc: dict[str, Any]) -> Path:
    stamp = f"{_dt.datetime.now():%Y%m%d-%H%M%S}"
    return Path("results") / "bench" / f"{stamp}-{doc['method']}-{doc['backbone']}-{secrets.token_hex(3)}.json"
