"""Where zsad-bench keeps caches: ``$ZSAD_BENCH_CACHE``, else ``$XDG_CACHE_HOME/zsad-bench``."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from zsad_bench.errors import ZsadError


def fresh_folder(parent: Path, prefix: str) -> Path:
    """A new, empty folder ``parent/<prefix><random>`` with the mode ``mkdir`` gives (``0o777 & ~umask``).

    Not ``tempfile.mkdtemp``, whose 0700 stays with a folder renamed into a shared cache: other users of
    the cache could not read it.
    """
    while True:
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def usable_folder(path: Path, what: str) -> Path:
    """``path`` if it is a folder or can become one: no part of it may be an existing non-folder.

    A one-line :class:`ZsadError` naming ``what`` (e.g. the variable that set it) otherwise, instead of a
    ``NotADirectoryError`` traceback at the first write.
    """
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "" if part == path else f" ({part} is a file)"
                raise ZsadError(f"{path}: {what} is not a folder{where}; point it at a folder")
            break
    return path


def output_problem(path: Path, folder: bool = False) -> str | None:
    """Why ``path`` cannot be written as an output file (or, with ``folder``, created as a folder); None if it can.

    Checked before any work, so a bad ``--out`` is one line instead of a traceback at the end of the run:
    a folder where a file is wanted, an existing file on the way, or a parent without write permission.
    """
    if not folder and path.is_dir():
        return f"{path} is a folder; give a file name"
    part = path if folder else path.parent
    while not part.exists() and part != part.parent:
        part = part.parent
    if not part.is_dir():
        return f"{part} is a file, not a folder; choose another path"
    if not os.access(part, os.W_OK | os.X_OK):
        return f"{part} is not writable; choose another path"
    return None


def cache_dir() -> Path:
    """Root of the feature cache and of reusable fitted artifacts (created on demand)."""
    env = os.environ.get("ZSAD_BENCH_CACHE")
    if env:
        return usable_folder(Path(env).expanduser(), "ZSAD_BENCH_CACHE")
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return usable_folder(base / "zsad-bench", "the cache folder ($XDG_CACHE_HOME/zsad-bench)")


def project_root() -> Path:
    """The checkout root (holds ``results/``); zsad-bench is installed editable from it."""
    return Path(__file__).resolve().parents[1]
