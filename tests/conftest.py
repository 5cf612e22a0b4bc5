"""Shared fixtures: the realmini data beside the checkout, a private cache dir per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# A fake installed distribution whose entry point registers the `toy-zeroshot` method, exactly as a
# third-party `pip install`-ed plugin would (see tests/toy_plugin).
TOY_PLUGIN_DIR = Path(__file__).resolve().parent / "toy_plugin"
sys.path.insert(0, str(TOY_PLUGIN_DIR))

REALMINI = Path(
    os.environ.get("ZSAD_REALMINI", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realmini")
)


@pytest.fixture(scope="session")
def realmini() -> Path:
    """Path of ``../shared/data/realmini``; tests using it skip with a visible reason when absent."""
    if not REALMINI.is_dir():
        pytest.skip(f"realmini data not found at {REALMINI} (set ZSAD_REALMINI to its path)")
    return REALMINI


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never touch the user's ~/.cache/zsad-bench from tests."""
    os.environ["ZSAD_BENCH_CACHE"] = str(tmp_path_factory.mktemp("zsad-cache"))
