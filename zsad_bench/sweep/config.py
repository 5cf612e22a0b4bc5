"""TOML config files: run options (``zsad-bench run --config``) and sweep grids (``zsad-bench sweep``).

Keys are the ``run`` command's option names (``image_size`` or ``image-size``); values are checked
against the same argparse actions (types, choices, lists), so a config file accepts exactly what the
command line accepts. ``tomllib`` reports no line numbers for values, so :func:`key_line` finds the
line of a key by scanning the text; every error is one line ``FILE:LINE: what; fix``.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Any

from zsad_bench.cli.common import device_name, non_negative_int, positive_int
from zsad_bench.errors import ZsadError

# Options the sweep sets per point itself (a grid may not set them), and parser entries that are no options.
SWEEP_MANAGED = ("out", "resume")

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    """``(document, text)`` of a TOML file; syntax errors become one line with the line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ZsadError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ZsadError(f"{path}: unreadable config file ({exc})") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise ZsadError(f"{path}: invalid TOML ({exc}); fix the syntax") from None


def key_line(text: str, section: str, key: str | None = None, occurrence: int = 0, strict: bool = False) -> int:
    """1-based line of ``key`` inside ``[section]`` (the ``occurrence``-th ``[[section]]`` for arrays).

    ``section`` "" is the top level. A dotted ``key`` ("set.sae_k") is also found as ``sae_k`` under
    ``[section.set]`` or inside an inline table. Falls back to the section header, then to line 1
    (``strict``: returns 0 when the key is not there).
    """
    current, seen, header_line = "", (0 if section == "" else -1), 0
    first, _, last = (key or "").partition(".")
    for no, raw in enumerate(text.splitlines(), 1):
        m = _HEADER.match(raw)
        if m:
            current = m.group(2).replace('"', "").replace(" ", "")
            if current == section:
                seen += 1
                if seen == occurrence:
                    header_line = no
            continue
        in_section = current == section and seen == occurrence
        in_sub = bool(last) and current == f"{section}.{first}" and seen == occurrence
        if key is None or not (in_section or in_sub):
            continue
        line = raw.split("#", 1)[0]
        bare = line.strip().replace('"', "")
        if in_sub and re.match(rf"{re.escape(last)}\s*=", bare):
            return no
        named = re.match(rf"{re.escape(key)}\s*=", bare) or re.match(rf"{re.escape(first)}\s*[=.]", bare)
        if in_section and named and (not last or re.search(rf"\b{re.escape(last)}\s*=", bare)):
            return no
    return 0 if strict else header_line or 1


def _scalar(value: Any, action: argparse.Action, where: str) -> Any:
    kind = action.type
    if kind in (int, positive_int, non_negative_int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
        if ok and kind is not int:  # the option's own bound, with its own message
            try:
                kind(str(value))
            except argparse.ArgumentTypeError as exc:
                raise ZsadError(f"{where}: {exc}") from None
    elif kind is device_name:
        if not isinstance(value, str):
            raise ZsadError(f"{where}: expected a string, got {value!r}")
        try:
            return device_name(value)
        except argparse.ArgumentTypeError as exc:
            raise ZsadError(f"{where}: {exc}") from None
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        want = "a number"
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
        want = "a string"
    if not ok:
        raise ZsadError(f"{where}: expected {want}, got {value!r}")
    if kind is Path:
        value = Path(value)
    if action.choices is not None and value not in action.choices:
        raise ZsadError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def convert_option(dest: str, value: Any, action: argparse.Action, where: str) -> Any:
    """A TOML value as the argparse value of option ``dest`` (raises ZsadError naming ``where``)."""
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ZsadError(f"{where}: expected true or false, got {value!r}")
        return value
    if dest == "set":
        if isinstance(value, dict):
            return [f"{k}={_set_text(v)}" for k, v in value.items()]
        value = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) and "=" in v for v in value):
            raise ZsadError(f"{where}: expected a table {{key = value}} or a list of 'key=value' strings")
        return value
    if isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        if not items and action.nargs == "+":
            raise ZsadError(f"{where}: expected at least one value")
        return [_scalar(v, action, where) for v in items]
    return _scalar(value, action, where)


def _set_text(value: Any) -> str:
    """A method option value as ``--set`` text (lists become comma-separated, as the CLI parses them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_set_text(v) for v in value)
    return str(value)


def check_options(
    table: dict[str, Any],
    actions: dict[str, argparse.Action],
    path: Path,
    text: str,
    section: str,
    occurrence: int = 0,
) -> dict[str, Any]:
    """Validate a table of run options against ``actions`` (``cli.run.run_actions()``); ``{dest: value}``."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        where = f"{path}:{key_line(text, section, key, occurrence)}: {key}"
        if dest in SWEEP_MANAGED:
            raise ZsadError(f"{where}: set by the sweep for each point; remove it")
        if dest not in actions:
            known = ", ".join(sorted(actions))
            raise ZsadError(f"{where}: unknown option; options: {known}")
        out[dest] = convert_option(dest, value, actions[dest], where)
    return out


def load_run_config(path: Path, actions: dict[str, argparse.Action]) -> dict[str, Any]:
    """``{dest: value}`` of a ``zsad-bench run --config FILE.toml`` (top-level keys = the run options ``actions``)."""
    doc, text = read_toml(path)
    for key, value in doc.items():
        if isinstance(value, dict) and key != "set":
            raise ZsadError(f"{path}:{key_line(text, key)}: [{key}]: a run config has no sections; write KEY = VALUE")
    out: dict[str, Any] = {}
    for key, value in doc.items():
        dest = key.replace("-", "_")
        where = f"{path}:{key_line(text, '', key)}: {key}"
        if dest not in actions:
            raise ZsadError(f"{where}: unknown option; options: {', '.join(sorted(actions))}")
        out[dest] = convert_option(dest, value, actions[dest], where)
    return out


def apply_run_config(
    args: argparse.Namespace, path: Path, actions: dict[str, argparse.Action], given: Collection[str]
) -> None:
    """Fill ``args`` from a run config: every option not in ``given`` (the dests on the command line) from the file.

    Method options merge per key: the file's ``set`` entries first, then the command line's, and
    :func:`~zsad_bench.cli.common.parse_set` keeps the last of a repeated key, so the command line wins.
    """
    for dest, value in load_run_config(path, actions).items():
        if dest == "set":
            args.set = [*value, *(args.set or [])]
        elif dest not in given:
            setattr(args, dest, value)
    if not getattr(args, "method", None):
        raise ZsadError(f'{path}: no method; set method = "..." in the file or pass --method')
