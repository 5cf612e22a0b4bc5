"""Provenance recorded in every results and benchmark file: package versions, git commit, device."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version

import torch

from zsad_bench import __version__
from zsad_bench.paths import project_root

PACKAGES = ("torch", "torchvision", "timm", "transformers", "open_clip_torch", "numpy", "scikit-learn", "scipy")


def package_versions() -> dict[str, str]:
    """Python, zsad-bench and the installed versions of the numerical packages a result depends on."""
    out = {"python": platform.python_version(), "zsad-bench": __version__}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def git_commit() -> str:
    """HEAD of the checkout zsad-bench runs from; empty outside a git checkout."""
    try:
        res = subprocess.run(
            ["git", "-C", str(project_root()), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def device_description(device: torch.device) -> str:
    """``cuda:<GPU name>`` or ``cpu:<processor> x<cores>``, with the torch CPU threads the run used.

    The thread count is part of what a run's numbers depend on (CPU reductions), so it is recorded:
    a sweep fixes it per point, a standalone run keeps torch's default.
    """
    threads = f", {torch.get_num_threads()} threads"
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}{threads}"
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}{threads}"
