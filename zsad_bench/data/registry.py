"""Dataset adapters by scheme: ``mvtec:PATH``, ``visa:PATH``, ``folder:PATH``, ``meta:PATH``, ``synthetic``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from zsad_bench.data.records import Dataset
from zsad_bench.errors import DataError
from zsad_bench.registry import Registry


class DatasetLoader(Protocol):
    def __call__(self, root: Path | None) -> Dataset: ...


@dataclass(frozen=True)
class DatasetAdapter:
    """A registered adapter: ``load(root)`` builds the dataset; ``needs_path`` is False for ``synthetic``."""

    scheme: str
    load: DatasetLoader
    description: str
    needs_path: bool = True


DATASETS: Registry[DatasetAdapter] = Registry("dataset adapter", "zsad_bench.datasets")


def register_dataset(
    scheme: str, description: str, needs_path: bool = True
) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator registering ``load(root) -> Dataset`` as the adapter for ``scheme:PATH``."""

    def deco(fn: DatasetLoader) -> DatasetLoader:
        DATASETS.register(scheme, DatasetAdapter(scheme, fn, description, needs_path))
        return fn

    return deco


def list_datasets() -> list[DatasetAdapter]:
    return [a for _, a in DATASETS.items()]


def open_dataset(spec: str, categories: Sequence[str] | None = None) -> Dataset:
    """Open ``SCHEME:PATH`` (or ``synthetic``/``synthetic:PATH``), optionally keeping ``categories``."""
    scheme, _, path = spec.partition(":")
    adapter = DATASETS.get(scheme)
    if adapter.needs_path and not path:
        raise DataError(f"dataset '{spec}' needs a path: use {scheme}:/path/to/root")
    root = Path(path).expanduser() if path else None
    if root is not None and adapter.needs_path and not root.exists():
        raise DataError(f"{root}: dataset root does not exist (from '{spec}'); check the path")
    try:
        ds = adapter.load(root)
    except OSError as exc:  # a listing or stat the adapter did not expect to fail (permissions, I/O errors)
        where = exc.filename or root
        raise DataError(f"{where}: cannot read ({exc.strerror or exc}); fix the path or its permissions") from None
    if categories:
        check_categories([ds], categories, str(ds.root))
        ds = ds.select(categories)
    return ds


def check_categories(datasets: Sequence[Dataset], categories: Sequence[str] | None, where: str, role: str = "") -> None:
    """Every entry of ``categories`` (None or empty: all) must be a category of one of ``datasets``.

    ``where`` names them in the error (a root, or the dataset specs joined by ``+``); ``role`` ("target",
    "auxiliary") qualifies the word category.
    """
    if not categories:
        return
    known = [c for ds in datasets for c in ds.categories]
    missing = [c for c in categories if c not in known]
    if missing:
        noun = f"{role} " * bool(role) + ("category" if len(missing) == 1 else "categories")
        raise DataError(f"{where}: unknown {noun} {', '.join(missing)}; available: {', '.join(known)}")
