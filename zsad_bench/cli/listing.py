"""``zsad-bench list methods|backbones|datasets [PATTERN]`` and ``list methods --details METHOD``."""

from __future__ import annotations

import argparse
import fnmatch

from tabulate import tabulate

from zsad_bench.errors import ZsadError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "list",
        help="list registered methods, backbones or dataset adapters",
        description="List what is registered (including third-party plugins found through entry points).",
    )
    p.add_argument("what", choices=("methods", "backbones", "datasets"))
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'spg*'")
    p.add_argument("--learning-type", choices=("training-free", "zero-shot", "few-shot"), help="methods only")
    p.add_argument(
        "--details", metavar="METHOD", help="methods only: print METHOD's paper and matched presets and its options"
    )
    p.set_defaults(func=_list)


def method_rows(pattern: str = "*", learning_type: str | None = None, controls: bool = False) -> list[list[str]]:
    """One row per method (or, with ``controls``, per control): name, learning type, default backbone,
    backbones it runs on, input, paper."""
    from zsad_bench.backbones import backbones_for, list_backbones
    from zsad_bench.detector import get_method_class, list_methods
    from zsad_bench.presets import is_control

    rows = []
    for name in list_methods(pattern, learning_type):
        cls = get_method_class(name)
        if is_control(cls) != controls:
            continue
        fits = backbones_for(cls)
        backbones = "any" if fits == [s.name for s in list_backbones()] else ", ".join(fits)
        if cls.needs_text:
            backbones += " (needs a text tower)"
        inputs = "images" if cls.needs_images else "cached features"
        rows.append([name, str(cls.learning_type), cls.default_backbone, backbones, inputs, cls.paper])
    return rows


def method_details(name: str) -> str:
    """What ``list methods --details NAME`` prints: the method, both presets, per-dataset defaults, options."""
    import dataclasses

    from zsad_bench.detector import get_method_class
    from zsad_bench.presets import describe, is_control

    cls = get_method_class(name)
    lines = [f"{name}: {cls.paper}", f"learning type: {cls.learning_type}" + (" (control)" if is_control(cls) else "")]
    lines += describe(cls)
    options = []
    for f in dataclasses.fields(cls.Config):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        meta = f.metadata
        note = meta.get("help", "")
        if meta.get("choices"):
            note += f" (choices: {', '.join(map(str, meta['choices']))})"
        inference = meta.get("inference")
        options.append([f.name, default, "predict" if inference else "fit", note])
    if options:
        lines += ["", tabulate(options, ["option", "default", "affects", "help"])]
    return "\n".join(lines)


def _list(args: argparse.Namespace) -> int:
    if args.details and args.what != "methods":
        raise ZsadError(f"--details applies to 'list methods'; use zsad-bench list methods --details {args.details}")
    if args.learning_type and args.what != "methods":
        raise ZsadError(
            "--learning-type applies to 'list methods'; "
            f"use zsad-bench list methods --learning-type {args.learning_type}"
        )
    if args.what == "methods":
        from zsad_bench.detector import METHODS

        if args.details:
            print(method_details(args.details))
            return 0
        head = ["method", "learning type", "default backbone", "backbones", "input", "paper"]
        rows = method_rows(args.pattern, args.learning_type)
        controls = method_rows(args.pattern, args.learning_type, controls=True)
        _require_some(rows + controls, "methods", args.pattern)
        print(tabulate(rows, head))
        if controls:
            print("\ncontrols (floors, not methods; never marked best in a table):")
            print(tabulate(controls, ["control", *head[1:]]))
        errors = METHODS.load_errors
    elif args.what == "backbones":
        from zsad_bench.backbones import BACKBONES, list_backbones

        rows = [
            [s.name, s.image_size, "yes" if s.has_text else "no", "yes" if s.offline else "no", s.source]
            for s in list_backbones(args.pattern)
        ]
        _require_some(rows, "backbones", args.pattern)
        print(tabulate(rows, ["backbone", "input size", "text tower", "offline", "source"]))
        errors = BACKBONES.load_errors
    else:
        from zsad_bench.data import DATASETS, list_datasets

        rows = [
            [f"{a.scheme}:PATH" if a.needs_path else f"{a.scheme}[:NAME]", a.description]
            for a in list_datasets()
            if fnmatch.fnmatch(a.scheme, args.pattern)
        ]
        _require_some(rows, "datasets", args.pattern)
        print(tabulate(rows, ["dataset spec", "description"]))
        errors = DATASETS.load_errors
    for name, err in errors.items():
        print(f"warning: plugin '{name}' failed to import: {err}")
    return 0


def _require_some(rows: list, what: str, pattern: str) -> None:
    """An empty listing is an error naming the pattern, not an empty table (exit 0)."""
    if not rows:
        raise ZsadError(f"no {what} match '{pattern}'; see zsad-bench list {what}")
