"""Argument helpers shared by the commands that run methods (``run``, ``bench``, ``ablate``).

Numeric options and ``--device`` are checked by their argparse ``type``: a bad value is refused
before anything runs (exit 2, the option named), never passed on to give empty metrics.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from zsad_bench.errors import ZsadError
from zsad_bench.features import PRECISIONS
from zsad_bench.paths import output_problem
from zsad_bench.presets import PRESETS
from zsad_bench.protocols import NAMED


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{"k": "v"}`` (values are converted later against the method's Config)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ZsadError(f"--set {item}: expected KEY=VALUE, e.g. --set sae_epochs=5")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def split_csv(value: str | None) -> list[str] | None:
    return [v for v in value.split(",") if v] if value else None


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1 (sizes, batch sizes, shots)."""
    number = _int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be a positive integer")
    return number


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0 (seeds, worker counts)."""
    number = _int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be 0 or a positive integer")
    return number


def device_name(value: str) -> str:
    """argparse type: ``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N``."""
    if not DEVICE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value}: unknown device; use auto, cpu, cuda, cuda:N (e.g. cuda:1) or mps")
    return value


def device_list(value: str) -> str:
    """argparse type: comma-separated devices, each as :func:`device_name` accepts (``cuda:0,cuda:1``)."""
    for item in value.split(","):
        device_name(item.strip())
    return value


def output_file(value: str) -> Path:
    """argparse type: a path an output file can be written to (not a folder, no file on the way)."""
    problem = output_problem(Path(value))
    if problem:
        raise argparse.ArgumentTypeError(f"{value}: {problem}")
    return Path(value)


def output_folder(value: str) -> Path:
    """argparse type: a path that is, or can become, a writable output folder."""
    problem = output_problem(Path(value), folder=True)
    if problem:
        raise argparse.ArgumentTypeError(f"{value}: {problem}")
    return Path(value)


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value}: not an integer") from None


def add_run_arguments(p: argparse.ArgumentParser, method_required: bool = True) -> None:
    """The options that define a run (method, backbone, datasets, seeds, config overrides)."""
    p.add_argument("--method", "-m", required=method_required, help="method name (zsad-bench list methods)")
    p.add_argument("--backbone", "-b", help="backbone name (default: the method's default; zsad-bench list backbones)")
    p.add_argument("--weights", help="local weights file/dir for the backbone (default: your HF/open_clip cache)")
    p.add_argument(
        "--image-size", type=positive_int, help="backbone input size S (default: the backbone's paper setting)"
    )
    p.add_argument(
        "--protocol",
        "-p",
        help=f"named protocol: {', '.join(NAMED)} (default: synthetic, unless --target is given)",
    )
    p.add_argument("--data-root", type=Path, help="folder holding the datasets of a named protocol")
    p.add_argument("--aux", action="append", default=[], metavar="DATASET", help="auxiliary dataset spec (repeatable)")
    p.add_argument("--target", action="append", default=[], metavar="DATASET", help="target dataset spec (repeatable)")
    p.add_argument("--categories", help="comma-separated target categories (default: all)")
    p.add_argument("--aux-categories", help="comma-separated auxiliary categories (default: all)")
    p.add_argument(
        "--aux-split",
        choices=("test", "train"),
        default="test",
        help="split the auxiliary set is trained on; the cross-dataset literature uses test (default)",
    )
    p.add_argument("--shots", type=positive_int, help="few-shot methods: k normal train images per target category")
    p.add_argument("--seed", type=non_negative_int, nargs="+", default=[111], help="one or more seeds (default: 111)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a method option (repeatable)")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="inference batch size (default: 8)")
    p.add_argument(
        "--num-workers",
        type=non_negative_int,
        help="DataLoader workers decoding images (default: from the CPU count; 0: decode in the main process)",
    )
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default="paper",
        help="paper (default): the method at its paper's backbone, size, layers and per-dataset options; "
        "matched: on the --backbone/--image-size being compared; control: a method's floor variant (spg: "
        "untrained guides). --backbone, --image-size and --set override it; zsad-bench list methods --details M",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or log lines")
    # --- precision policy (issue #13; zsad_bench.features) -------------------------------------------
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="feature extraction and fit precision: fp32 (default, as the SPG release), tf32 (TF32 matmuls on "
        "CUDA), bf16 (bf16 backbone weights, float16 cache); recorded, and part of every cache and fit key",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic CUDA algorithms (bitwise repeatable GPU runs, slower; recorded)",
    )


def seed_or_all(text: str) -> int | str:
    """argparse type of ``plot`` / ``report`` ``--seed``: a seed (an integer) or ``all``."""
    from zsad_bench.viz.plots import ALL_SEEDS

    if text == ALL_SEEDS:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a seed (an integer) nor '{ALL_SEEDS}'") from None
