"""Packaging (issue #10 item 3): plugins live inside the package; a non-editable install works on its own."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _spec_in_root(name: str) -> tuple[object, list[Path]]:
    """``find_spec(name)`` as seen from the repository root (the root first on sys.path, as for ``python -c``)."""
    code = (
        "import importlib.util, json, sys; s = importlib.util.find_spec(sys.argv[1]); "
        "print(json.dumps(None if s is None else [s.origin, list(s.submodule_search_locations or [])]))"
    )
    out = subprocess.run([sys.executable, "-c", code, name], cwd=ROOT, capture_output=True, text=True, check=True)
    import json

    found = json.loads(out.stdout)
    return (None, []) if found is None else (found[0], [Path(p) for p in found[1]])


@pytest.mark.parametrize("name", ["datasets", "methods", "results", "benchmarks"])
def test_top_level_folders_are_no_import_root(name: str) -> None:
    """From the checkout root, none of these names imports code of ours.

    A folder without ``__init__.py`` is at most a namespace portion (origin None, no module inside): a real
    package of that name (Hugging Face ``datasets``) always wins over it, and ``transformers``' availability
    check also needs the package's metadata, which a bare folder has not.
    """
    origin, locations = _spec_in_root(name)
    if origin is not None:
        assert not Path(origin).resolve().is_relative_to(ROOT), f"{name} resolves to {origin} in the checkout"
        return
    for loc in locations:
        if loc.resolve().is_relative_to(ROOT):
            assert not (loc / "__init__.py").exists(), f"{loc} is a regular package"
            if name != "benchmarks":  # benchmark scripts are run as files, never imported by name
                assert not list(loc.glob("*.py")), f"{loc} holds Python modules"
    if importlib.util.find_spec(name) is not None and name == "datasets" and _has_dist("datasets"):
        assert origin is not None  # the installed Hugging Face package, not our folder


def _has_dist(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
def test_non_editable_install_runs_table_with_reported_and_run(tmp_path: Path) -> None:
    """``pip install --no-deps --target DIR .`` beside the installed dependencies: reported figures ship as
    package data, plugins and commands come from the installed copy's entry points."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            ".",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target), "ZSAD_BENCH_CACHE": str(tmp_path / "cache")}
    work = tmp_path / "elsewhere"  # not the checkout: nothing may come from the source tree
    work.mkdir()

    def cli(*args: str) -> subprocess.CompletedProcess:
        code = "import sys; from zsad_bench.cli.main import main; sys.exit(main(sys.argv[1:]))"
        return subprocess.run([sys.executable, "-c", code, *args], cwd=work, env=env, capture_output=True, text=True)

    where = subprocess.run(
        [sys.executable, "-c", "import zsad_bench; print(zsad_bench.__file__)"], cwd=work, env=env, capture_output=True
    )
    assert Path(where.stdout.decode().strip()).is_relative_to(target)
    table = cli("table", "--with-reported", "--metric", "image_auroc")
    assert table.returncode == 0, table.stderr
    assert "SPG (DINOv3) (reported)" in table.stdout and "91.4" in table.stdout  # SPG Table 1, VisA -> MVTec
    run = cli(
        "run", "--method", "control-random", "--backbone", "effnet-lite0", "--image-size", "64",
        "--categories", "cap", "--out", str(work / "r.json"), "-q",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (work / "r.json").is_file() and "cap" in run.stdout
