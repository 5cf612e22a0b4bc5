"""The results store: one self-describing JSON file per run (plus a long-form CSV beside it).

Schema ``zsad-bench/results/v1``::

    {"schema": ..., "kind": "eval", "run_id", "method", "method_label", "backbone", "protocol",
     "aux": [dataset specs], "targets": [dataset specs], "config": {...}, "seeds": [...],
     "learning_type", "versions": {...}, "git_commit", "device", "created",
     "metric_variants": {metric: description},
     "records": [{"seed", "protocol" (leg), "target", "category", "n_images", "metrics": {name: fraction},
                  "seconds"}],
     "summary": {name: number}, "timings": {name: seconds},
     "artifacts": {name: path of a fitted checkpoint ...}, "complete": bool}

Metric values are fractions in [0, 1] (tables show percentages); NaN is stored as null.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zsad_bench.errors import ZsadError

SCHEMA = "zsad-bench/results/v1"
LONG_COLUMNS = ("protocol", "metric", "category", "method", "backbone", "seed", "target", "value")


@dataclass
class CategoryRecord:
    """Metrics of one target category for one seed and protocol leg (e.g. ``visa-to-mvtec``)."""

    seed: int
    target: str
    category: str
    n_images: int
    metrics: dict[str, float]
    seconds: float = 0.0
    protocol: str = ""


@dataclass
class RunResult:
    run_id: str
    method: str
    method_label: str
    backbone: str
    protocol: str
    aux: list[str]
    targets: list[str]
    config: dict[str, Any]
    seeds: list[int]
    learning_type: str
    metric_variants: dict[str, str]
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str = ""
    device: str = "cpu"
    created: str = ""
    records: list[CategoryRecord] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    complete: bool = False
    kind: str = "eval"
    schema: str = SCHEMA

    def to_json(self) -> dict[str, Any]:
        return _nan_to_none(asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path | str = "<memory>") -> RunResult:
        if data.get("schema") != SCHEMA:
            raise ZsadError(f"{source}: not a zsad-bench results file (schema {data.get('schema')!r}, want {SCHEMA})")
        data = dict(data)
        data["records"] = [
            CategoryRecord(**{**r, "metrics": {k: _none_to_nan(v) for k, v in r["metrics"].items()}})
            for r in data.get("records", [])
        ]
        try:
            return cls(**data)
        except TypeError as exc:
            raise ZsadError(f"{source}: malformed results file ({exc})") from None

    @classmethod
    def load(cls, path: Path) -> RunResult:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ZsadError(f"{path}: results file not found") from None
        except json.JSONDecodeError as exc:
            raise ZsadError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); re-run or delete it") from None
        return cls.from_json(data, path)

    def save(self, path: Path, overwrite: bool = False) -> None:
        """Atomically write ``path`` (JSON) and ``path.with_suffix('.csv')`` (long form)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ZsadError(f"{path}: results file exists; pass --resume to continue it or choose another --out")
        atomic_write_text(path, json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        atomic_write_text(path.with_suffix(".csv"), self.long_csv())

    def long_rows(self) -> list[dict[str, Any]]:
        """One row per (seed, target, category, metric); values as fractions."""
        return [
            {
                "protocol": r.protocol or self.protocol,
                "metric": m,
                "category": r.category,
                "method": self.method_label,
                "backbone": self.backbone,
                "seed": r.seed,
                "target": r.target,
                "value": v,
            }
            for r in self.records
            for m, v in r.metrics.items()
        ]

    def long_csv(self) -> str:
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=LONG_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.long_rows())
        return buf.getvalue()


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory + ``os.replace`` (never a half-written file)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Atomic write of ``data``; ``durable`` also fsyncs (skipped for cache entries, which are checksummed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    return obj


def _none_to_nan(v: Any) -> float:
    return float("nan") if v is None else float(v)
