"""A small name -> factory registry in the style of timm's ``register_model``.

Each kind of plugin (methods, backbones, dataset adapters) has one :class:`Registry`. Plugins
shipped with zsad-bench and third-party ones both register by importing their module; third-party
packages expose that module through a Python entry-point group (``zsad_bench.methods`` ...), which
the registry loads lazily the first time a name is looked up or listed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from zsad_bench.errors import ZsadError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to registered objects (classes or factories) of one plugin kind."""

    def __init__(self, kind: str, entry_point_group: str) -> None:
        self.kind = kind
        self.group = entry_point_group
        self._items: dict[str, T] = {}
        self._loaded = False
        self._load_errors: dict[str, str] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as ``@registry.register("name")``."""

        def _add(item: T) -> T:
            existing = self._items.get(name)
            if existing is not None and existing is not item:
                raise ZsadError(f"{self.kind} '{name}' is registered twice ({existing!r} and {item!r})")
            self._items[name] = item
            return item

        return _add if obj is None else _add(obj)

    def load_plugins(self) -> None:
        """Import every module exposed under this registry's entry-point group (once)."""
        if self._loaded:
            return
        self._loaded = True
        for ep in entry_points(group=self.group):
            try:
                ep.load()
            except Exception as exc:  # a broken third-party plugin must not hide the others
                self._load_errors[ep.name] = f"{type(exc).__name__}: {exc}"

    def get(self, name: str) -> T:
        """Return the object registered as ``name`` or fail with the list of known names."""
        if name not in self._items:
            self.load_plugins()
        if name not in self._items:
            known = ", ".join(self.names()) or "none"
            hint = (
                f" (plugin '{name}' failed to import: {self._load_errors[name]})" if name in self._load_errors else ""
            )
            raise ZsadError(f"unknown {self.kind} '{name}'{hint}; known: {known}")
        return self._items[name]

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a shell-style ``pattern``."""
        self.load_plugins()
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def items(self, pattern: str = "*") -> list[tuple[str, T]]:
        return [(n, self._items[n]) for n in self.names(pattern)]

    @property
    def load_errors(self) -> dict[str, str]:
        """Entry points that failed to import, name -> error (shown by ``zsad-bench list``)."""
        self.load_plugins()
        return dict(self._load_errors)
