"""Sweeps: grids of runs from one TOML file, run on this machine's devices or a Ray cluster.

:mod:`.config` reads TOML (run configs and grids), :mod:`.plan` expands a grid into points and shared
stages, :mod:`.engines` runs tasks (local or Ray), :mod:`.tasks` is what a worker executes, and
:mod:`.driver` ties them together with the manifest and the progress line.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from zsad_bench.cli.common import device_list, positive_int
from zsad_bench.errors import ZsadError


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """``--engine``, ``--address``, ``--num-cpus``, ``--devices``, ``--threads``, ``--gpus-per-point``."""
    p.add_argument("--engine", choices=("local", "ray"), default="local", help="where points run (default: local)")
    p.add_argument("--address", help="--engine ray: join this Ray cluster ('auto': the one this node belongs to)")
    p.add_argument(
        "--num-cpus", type=positive_int, help="--engine ray without --address: CPUs of the local Ray started"
    )
    p.add_argument(
        "--devices",
        type=device_list,
        help="--engine local: comma-separated devices, one worker each (default: every visible GPU)",
    )
    p.add_argument(
        "--threads", type=positive_int, help="torch threads per point (default: 1 under Ray, else cores / workers)"
    )
    p.add_argument(
        "--gpus-per-point",
        type=float,
        help="--engine ray: GPUs per task, fractional to share a GPU, e.g. 0.25 (default: 1 if the cluster has GPUs)",
    )


def build_engine(args: argparse.Namespace, threads: int | None, gpus: float | None) -> tuple[Any, int, float]:
    """(engine, threads per point, GPUs per task) from the engine arguments and a grid's defaults."""
    from zsad_bench.sweep.engines import LocalEngine, RayEngine, visible_devices

    threads = args.threads or threads
    if threads is not None and threads < 1:
        raise ZsadError(f"--threads {threads}: must be >= 1")
    gpus = args.gpus_per_point if args.gpus_per_point is not None else gpus
    if gpus is not None and not (gpus >= 0 and (gpus <= 1 or float(gpus).is_integer())):
        raise ZsadError(f"--gpus-per-point {gpus}: use a fraction in (0, 1] or a whole number of GPUs")
    if args.engine == "ray":
        if args.devices:
            raise ZsadError("--devices is for --engine local; Ray assigns GPUs itself (see --gpus-per-point)")
        engine = RayEngine(args.address, args.num_cpus)
        cpus = engine.ray.cluster_resources().get("CPU", 0.0)
        if (threads or 1) > cpus:
            raise ZsadError(f"--threads {threads}: the Ray cluster has {cpus:g} CPUs; a point could never be scheduled")
        if gpus is None:
            gpus = 1.0 if engine.cluster_gpus() else 0.0
        return engine, threads or 1, gpus
    if args.address or args.num_cpus or args.gpus_per_point is not None:
        raise ZsadError("--address, --num-cpus and --gpus-per-point are for --engine ray")
    devices = [d for d in args.devices.split(",") if d] if args.devices else visible_devices()
    import torch

    default = torch.get_num_threads() if len(devices) == 1 else max(1, (os.cpu_count() or 1) // len(devices))
    return LocalEngine(devices), threads or default, 0.0
