"""What a sweep worker executes: one point (an ordinary run, resumed where it stopped) or one fill shard.

Tasks take and return plain dicts so any engine (in process, a process pool, Ray) can ship them; a
task never raises: failures come back as ``{"status": "failed", "reason": one line}`` with the
traceback in the task's log file. Each task fixes ``torch.set_num_threads(threads)`` (Ray workers
start with ``OMP_NUM_THREADS=1``, a standalone run with one thread per core), so its numbers do not
depend on the engine, and points its feature cache at the sweep's ``cache_dir``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zsad_bench.errors import ZsadError


@contextlib.contextmanager
def _environment(payload: dict[str, Any]) -> Iterator[Any]:
    """Threads, cache dir and a log file (stdout + stderr) for the task; restored afterwards."""
    import torch

    old_threads, old_cache = torch.get_num_threads(), os.environ.get("ZSAD_BENCH_CACHE")
    torch.set_num_threads(int(payload["threads"]))
    os.environ["ZSAD_BENCH_CACHE"] = str(payload["cache_dir"])
    log = Path(payload["log"])
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log, "a", encoding="utf-8") as fh, contextlib.redirect_stderr(fh), contextlib.redirect_stdout(fh):
            print(
                f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {payload['kind']} {payload['id']} on "
                f"{socket.gethostname()} pid {os.getpid()} device {payload['device']} threads {payload['threads']}",
                flush=True,
            )
            yield fh
    finally:
        torch.set_num_threads(old_threads)
        if old_cache is None:
            os.environ.pop("ZSAD_BENCH_CACHE", None)
        else:
            os.environ["ZSAD_BENCH_CACHE"] = old_cache


def execute_task(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one task dict (``kind`` "point" or "fill"); returns its status dict."""
    t0 = time.perf_counter()
    info = {"id": payload["id"], "kind": payload["kind"], "pid": os.getpid(), "host": socket.gethostname()}
    info.update(device=payload["device"], threads=int(payload["threads"]))
    try:
        with _environment(payload):
            try:
                extra = run_point(payload) if payload["kind"] == "point" else fill_shard(payload)
            except ZsadError as exc:
                print(f"zsad-bench: error: {exc}", flush=True)
                return {**info, "status": "failed", "reason": str(exc), "seconds": time.perf_counter() - t0}
            except Exception as exc:
                traceback.print_exc()
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
                return {**info, "status": "failed", "reason": reason, "seconds": time.perf_counter() - t0}
    except OSError as exc:
        return {**info, "status": "failed", "reason": f"{payload['log']}: cannot write the log ({exc})"}
    return {**info, **extra, "status": "done", "seconds": time.perf_counter() - t0}


def run_point(payload: dict[str, Any]) -> dict[str, Any]:
    """The point's run, resumed from its last finished category (the runner records its thread count)."""
    from zsad_bench.runner import run_experiment
    from zsad_bench.sweep.plan import spec_from_options

    spec = spec_from_options(payload["options"])
    spec.out = Path(payload["out"])
    spec.resume = True
    if spec.device == "auto":  # an explicit device option of the grid wins over the engine's assignment
        spec.device = payload["device"]
    spec.progress = True
    if payload.get("lock"):  # the leader of a shared-fit group: one fit across concurrent sweeps
        from filelock import FileLock

        from zsad_bench.paths import cache_dir

        (cache_dir() / "locks").mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache_dir() / "locks" / f"{payload['lock']}.lock")):
            result, _ = run_experiment(spec)
    else:
        result, _ = run_experiment(spec)
    return {"categories": len(result.records), "device": spec.device}


def fill_shard(payload: dict[str, Any]) -> dict[str, Any]:
    """Extract and cache one shard's features (under a lock per shard, so concurrent sweeps share the work)."""
    from filelock import FileLock

    from zsad_bench.backbones import create_backbone
    from zsad_bench.features import FeatureCache, extract_features
    from zsad_bench.paths import cache_dir
    from zsad_bench.runner import resolve_device

    device = resolve_device(payload["device"])
    lock_dir = cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / f"{payload['id']}.lock")):
        backbone = create_backbone(
            payload["backbone"],
            weights=payload["weights"],
            image_size=payload["image_size"],
            **payload["backbone_kwargs"],
        ).to(device)
        computed = cached = 0
        for block in payload["blocks"]:  # each block is batch-aligned with the runner's own extraction
            store = extract_features(
                backbone,
                block,
                layers=payload["layers"],
                cache=FeatureCache(),
                batch_size=int(payload["batch_size"]),
                device=device,
                progress=False,
                precision=payload.get("precision", "fp32"),
            )
            computed, cached = computed + store.misses, cached + store.hits
    print(f"cache fill {payload['dataset']} shard {payload['shard']}: {computed} computed, {cached} cached")
    return {"computed": computed, "cached": cached}
