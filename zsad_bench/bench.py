"""Inference throughput and latency of a method against its backbone alone (``zsad-bench bench``).

For each dtype and batch size the backbone forward, the method's own work on top of it and the
total are timed after a warm-up, with CUDA synchronisation around every iteration on GPU. The
results file (schema ``zsad-bench/bench/v1``) renders with ``zsad-bench table``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
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
from zsad_bench.provenance import device_description, git_commit, package_versions
from zsad_bench.runner import RunSpec, Session, load_fitted, open_datasets

SCHEMA = "zsad-bench/bench/v1"
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


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak RSS)


def _row(spec: BenchSpec, device: torch.device, dtype: str, bs: int, component: str, times: list[float]) -> dict:
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
        "peak_mem_mb": _peak_mem_mb(device),
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


def run_bench(spec: BenchSpec) -> dict[str, Any]:
    """Time backbone, method and total for every dtype x batch size; returns the results document."""
    for d in spec.dtypes:
        if d not in DTYPES:
            raise ZsadError(f"--dtype {d}: choose from {', '.join(DTYPES)}")
    runner = fitted_runner(spec)
    spec.backbone = runner.backbone_name
    device, backbone, detector = runner.device, runner.backbone, runner.detector
    samples = open_datasets(("synthetic:objects",), None, "test", "target").samples
    images = torch.stack([backbone.preprocess(load_image(s.image_path)) for s in samples[: max(spec.batch_sizes)]])
    rows = []
    for dtype in spec.dtypes:
        autocast = torch.autocast(device.type, dtype=DTYPES[dtype]) if dtype != "fp32" else contextlib.nullcontext()
        for bs in spec.batch_sizes:
            reps = -(-bs // len(images))
            x = images.repeat(reps, 1, 1, 1)[:bs].to(device)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
                torch.cuda.reset_peak_memory_stats(device)
            batch_samples = (samples * reps)[:bs]
            with torch.inference_mode(), autocast:
                feats = backbone.forward_features(x, runner.cls.feature_layers)

                def backbone_fn(x=x):
                    return backbone.forward_features(x, runner.cls.feature_layers)

                if runner.cls.needs_images:

                    def total_fn(x=x, s=batch_samples):
                        return detector.predict(Batch(s, None, images=x))

                    method_times = None
                else:

                    def method_fn(f=feats, s=batch_samples):
                        return detector.predict(Batch(s, f))

                    def total_fn(x=x, s=batch_samples):
                        return detector.predict(Batch(s, backbone_fn(x)))

                    method_times = time_fn(method_fn, device, spec.warmup, spec.iters)
                backbone_times = time_fn(backbone_fn, device, spec.warmup, spec.iters)
                total_times = time_fn(total_fn, device, spec.warmup, spec.iters)
            rows.append(_row(spec, device, dtype, bs, "backbone", backbone_times))
            if method_times is not None:
                rows.append(_row(spec, device, dtype, bs, "method", method_times))
            total = _row(spec, device, dtype, bs, "total", total_times)
            total["overhead_vs_backbone"] = statistics.fmean(total_times) / statistics.fmean(backbone_times) - 1.0
            rows.append(total)
    return {
        "schema": SCHEMA,
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
    }


def default_bench_path(doc: dict[str, Any]) -> Path:
    stamp = f"{_dt.datetime.now():%Y%m%d-%H%M%S}"
    return Path("results") / "bench" / f"{stamp}-{doc['method']}-{doc['backbone']}-{secrets.token_hex(3)}.json"
