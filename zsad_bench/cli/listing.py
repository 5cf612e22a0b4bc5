"""``zsad-bench list methods|backbones|datasets [PATTERN]``."""

from __future__ import annotations

import argparse
import fnmatch

from tabulate import tabulate


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "list",
        help="list registered methods, backbones or dataset adapters",
        description="List what is registered (including third-party plugins found through entry points).",
    )
    p.add_argument("what", choices=("methods", "backbones", "datasets"))
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'spg*'")
    p.add_argument("--learning-type", choices=("training-free", "zero-shot", "few-shot"), help="methods only")
    p.set_defaults(func=_list)


def method_rows(pattern: str = "*", learning_type: str | None = None) -> list[list[str]]:
    """One row per method: name, learning type, default backbone, backbones it runs on, input, paper."""
    from zsad_bench.detector import get_method_class, list_methods

    rows = []
    for name in list_methods(pattern, learning_type):
        cls = get_method_class(name)
        if cls.supported_backbones is None:
            backbones = "any"
        else:
            backbones = ", ".join(cls.supported_backbones)
            if cls.needs_text:
                backbones += " (needs a text tower)"
        inputs = "images" if cls.needs_images else "cached features"
        rows.append([name, str(cls.learning_type), cls.default_backbone, backbones, inputs, cls.paper])
    return rows


def _list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from zsad_bench.detector import METHODS

        rows = method_rows(args.pattern, args.learning_type)
        print(tabulate(rows, ["method", "learning type", "default backbone", "backbones", "input", "paper"]))
        errors = METHODS.load_errors
    elif args.what == "backbones":
        from zsad_bench.backbones import BACKBONES, list_backbones

        rows = [
            [s.name, s.image_size, "yes" if s.has_text else "no", "yes" if s.offline else "no", s.source]
            for s in list_backbones(args.pattern)
        ]
        print(tabulate(rows, ["backbone", "input size", "text tower", "offline", "source"]))
        errors = BACKBONES.load_errors
    else:
        from zsad_bench.data import DATASETS, list_datasets

        rows = [
            [f"{a.scheme}:PATH" if a.needs_path else f"{a.scheme}[:NAME]", a.description]
            for a in list_datasets()
            if fnmatch.fnmatch(a.scheme, args.pattern)
        ]
        print(tabulate(rows, ["dataset spec", "description"]))
        errors = DATASETS.load_errors
    for name, err in errors.items():
        print(f"warning: plugin '{name}' failed to import: {err}")
    return 0
