"""Method options: a Detector's ``Config`` dataclass read from ``--set key=value`` strings and checked.

A Config field's ``metadata`` may declare ``"inference": True`` (only predict() reads it: changing it
reuses a fitted checkpoint), numeric bounds ``"ge"``/``"gt"``/``"le"``/``"lt"`` (element-wise for
tuples), ``"choices": (...)`` and ``"help": "..."``. Values outside them are refused with one line
before any weights load or work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from zsad_bench.errors import ZsadError

# ``cls`` below is a Detector subclass (anything with ``name`` and a ``Config`` dataclass): this module sits
# under zsad_bench.detector, which re-exports it, so it does not import the Detector class itself.
MethodClass = type


def parse_overrides(cls: MethodClass, overrides: dict[str, Any]) -> Any:
    """Build ``cls.Config`` from ``{field: value}``; strings (from the CLI) are converted to field types.

    Unknown keys, unreadable values and values outside a field's declared bounds/choices raise a
    one-line :class:`ZsadError`.
    """
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    hints = typing.get_type_hints(cls.Config)
    kwargs: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise ZsadError(f"method '{cls.name}' has no option '{key}'; options: {known}")
        kwargs[key] = _convert(value, hints[key], f"{cls.name}.{key}") if isinstance(value, str) else value
    config = cls.Config(**kwargs)
    for f in dataclasses.fields(config):  # defaults too: a plugin's own default outside its bounds is a bug
        check_option(cls.name, f, getattr(config, f.name))
    return config


_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b), "le": ("<=", lambda v, b: v <= b)}
_BOUNDS["lt"] = ("<", lambda v, b: v < b)


def check_option(method: str, f: dataclasses.Field, value: Any) -> None:
    """Refuse ``value`` outside the bounds/choices in ``f.metadata`` (tuples: every element)."""
    meta = f.metadata
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ZsadError(
            f"option {method}.{f.name}={value!r}: choose one of {', '.join(map(str, choices))}; fix --set {f.name}=..."
        )
    length = meta.get("length")
    if length is not None and value is not None and (not isinstance(value, list | tuple) or len(value) != length):
        raise ZsadError(
            f"option {method}.{f.name}={value!r}: expected {length} comma-separated values; fix --set {f.name}=..."
        )
    items = value if isinstance(value, list | tuple) else [value]
    for key, (op, ok) in _BOUNDS.items():
        if key in meta and any(v is not None and not ok(v, meta[key]) for v in items):
            raise ZsadError(f"option {method}.{f.name}={value!r}: must be {op} {meta[key]}; fix --set {f.name}=...")


def inference_options(cls: MethodClass) -> frozenset[str]:
    """Config fields that only affect predict() (``metadata={"inference": True}``): changing them reuses a fit."""
    return frozenset(f.name for f in dataclasses.fields(cls.Config) if f.metadata.get("inference"))


def option_help(cls: MethodClass) -> dict[str, str]:
    """``{field: help text}`` of the Config fields that declare one (``zsad-bench list methods -v``)."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls.Config) if "help" in f.metadata}


def _convert(value: str, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null") and type(None) in typing.get_args(hint):
            return None
        return _convert(value, args[0], where)
    if origin is tuple or origin is list:
        conv = [_convert(v, args[0], where) for v in value.split(",") if v]
        if origin is tuple and Ellipsis not in args and len(conv) != len(args):
            raise ZsadError(f"option {where}: expected {len(args)} comma-separated values, got '{value}'")
        return tuple(conv) if origin is tuple else conv
    try:
        if hint is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return hint(value)
    except (TypeError, ValueError):
        raise ZsadError(f"option {where}: cannot read '{value}' as {getattr(hint, '__name__', hint)}") from None
