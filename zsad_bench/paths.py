"""Where zsad-bench keeps caches: ``$ZSAD_BENCH_CACHE``, else ``$XDG_CACHE_HOME/zsad-bench``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the feature cache and of reusable fitted artifacts (created on demand)."""
    env = os.environ.get("ZSAD_BENCH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "zsad-bench"


def project_root() -> Path:
    """The checkout root (holds ``results/``); zsad-bench is installed editable from it."""
    return Path(__file__).resolve().parents[1]
