"""The results store: one self-describing JSON file per run (plus a long-form CSV beside it).

Schema ``zsad-bench/results/v2``::

    {"schema": ..., "kind": "eval", "run_id", "method", "method_label", "backbone", "protocol",
     "aux": [dataset specs], "targets": [dataset specs], "config": {...}, "seeds": [...],
     "learning_type", "versions": {...}, "git_commit", "device", "created",
     "metric_variants": {metric: description},
     "records": [{"seed", "protocol" (leg), "target", "category", "n_images", "metrics": {name: fraction},
                  "seconds"}],
     "images": [{"seed", "leg", "target", "category", "path", "defect", "label", "score"}],
     "fits": [{"seed", "leg", "checkpoint", "seconds", "summary": {name: number}}],
     "timings": {name: seconds}, "complete": bool}

``v1`` files (no ``images``/``fits``; fitted checkpoints and summaries under string keys such as
``checkpoint|{leg}|seed={seed}``) still load: their keys become :class:`FitRecord` objects.
Metric values are fractions in [0, 1] (tables show percentages); NaN is stored as null. Every load
validates the document (:func:`validate`), so a hand-edited file fails with one line naming the
offending entry instead of rendering a wrong number.
"""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zsad_bench.errors import ZsadError

SCHEMA = "zsad-bench/results/v2"
SCHEMA_V1 = "zsad-bench/results/v1"
READABLE_SCHEMAS = (SCHEMA_V1, SCHEMA)
BENCH_SCHEMA = "zsad-bench/bench/v1"  # `zsad-bench bench` files, which live beside results files
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
class ImageRecord:
    """The image score of one evaluated image (with its label and defect type)."""

    seed: int
    leg: str
    target: str
    category: str
    path: str
    defect: str
    label: int
    score: float


@dataclass
class FitRecord:
    """A fitted detector of one seed and leg: its checkpoint, fit time and the method's summary numbers."""

    seed: int
    leg: str
    checkpoint: str
    seconds: float = 0.0
    summary: dict[str, float] = field(default_factory=dict)


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
    images: list[ImageRecord] = field(default_factory=list)
    fits: list[FitRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    complete: bool = False
    kind: str = "eval"
    schema: str = SCHEMA

    @property
    def artifacts(self) -> dict[str, str]:
        """v1 view of the fitted checkpoints: ``checkpoint|{leg}|seed={seed}`` -> path."""
        return {f"checkpoint|{f.leg}|seed={f.seed}": f.checkpoint for f in self.fits}

    @property
    def summary(self) -> dict[str, float]:
        """v1 view of the fit summaries: ``{name}|{leg}|seed={seed}`` -> value."""
        return {f"{k}|{f.leg}|seed={f.seed}": v for f in self.fits for k, v in f.summary.items()}

    def fit_for(self, leg: str, seed: int) -> FitRecord | None:
        """The fit record of ``leg`` and ``seed`` (None for methods that fit nothing per leg)."""
        return next((f for f in self.fits if f.leg == leg and f.seed == seed), None)

    def to_json(self) -> dict[str, Any]:
        return _nan_to_none(asdict(self))

    @classmethod
    def from_json(cls, data: Any, source: Path | str = "<memory>") -> RunResult:
        """Validate ``data`` (v1 or v2) and build the result; one-line ZsadError on any problem."""
        data = validate(data, source)
        data = _upgrade_v1(data) if data["schema"] == SCHEMA_V1 else dict(data)
        data["records"] = [
            CategoryRecord(**{**r, "metrics": {k: _none_to_nan(v) for k, v in r["metrics"].items()}})
            for r in data.get("records", [])
        ]
        data["images"] = [ImageRecord(**{**r, "score": _none_to_nan(r["score"])}) for r in data.get("images", [])]
        data["fits"] = [FitRecord(**r) for r in data.get("fits", [])]
        data["schema"] = SCHEMA
        try:
            return cls(**data)
        except TypeError as exc:
            raise ZsadError(f"{source}: malformed results file ({exc}); re-run or restore it") from None

    @classmethod
    def load(cls, path: Path) -> RunResult:
        return cls.from_json(read_json(path), path)

    def save(self, path: Path, overwrite: bool = False) -> None:
        """Atomically write ``path`` (JSON) and ``path.with_suffix('.csv')`` (long form)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ZsadError(f"{path}: results file exists; pass --resume to continue it or choose another --out")
        atomic_write_text(path, json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        atomic_write_text(csv_path(path), self.long_csv())

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


def csv_path(path: Path) -> Path:
    """The long-form CSV written beside a results JSON."""
    return Path(path).with_suffix(".csv")


def read_json(path: Path | str) -> Any:
    """The JSON document of a results (or benchmark) file; missing, unreadable or not JSON is one line."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ZsadError(f"{path}: results file not found") from None
    except json.JSONDecodeError as exc:
        raise ZsadError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); re-run or remove it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ZsadError(f"{path}: unreadable results file ({exc}); check the file") from None


def require_finite_scores(images: Sequence[Any], source: Path | str) -> None:
    """Refuse per-image records (dicts or :class:`ImageRecord`) whose score is null/NaN/inf: curves, histograms
    and intervals need every score (the file itself is valid, so only the commands that use scores check)."""
    for i, img in enumerate(images):
        score = img["score"] if isinstance(img, dict) else img.score
        if score is None or not math.isfinite(score):
            raise ZsadError(f"{source}: images[{i}] has no finite score (null); re-run or remove the file")


def results_files(paths: Sequence[Path | str]) -> list[Path]:
    """The ``*.json`` files of ``paths``: files as given, folders (a sweep directory) by their top-level ``*.json``.

    Sub-folders are not searched: a sweep keeps its manifest and logs in ``_sweep/``, saved maps in ``*.maps/``.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise ZsadError(f"{p}: directory holds no *.json results files; pass results files or a sweep folder")
            files += found
        elif p.is_file():
            files.append(p)
        elif p.exists():  # reading a FIFO would block, a device would never end
            raise ZsadError(f"{p}: not a regular file (a FIFO, socket or device); pass a results JSON file")
        else:
            raise ZsadError(f"{p}: no such results file or directory")
    return files


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory + ``os.replace`` (never a half-written file)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Atomic write of ``data``; ``durable`` also fsyncs (skipped for cache entries, which are checksummed).

    The file gets the mode of a new file from ``open(path, "w")``, ``0o666 & ~umask``, also when it
    replaces one (a file written 0600 by an earlier version becomes readable on its next write).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp, whose 0600 would become the file's mode: created with 0o666, the temp file gets
    # the umask from the kernel, as open() does, so the umask is never read (reading it means setting it,
    # process-wide, under other threads' feet). O_EXCL never takes over an existing file.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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


# ---------------------------------------------------------------------------------------------- validation
_HEADER = {
    "run_id": str,
    "method": str,
    "method_label": str,
    "backbone": str,
    "protocol": str,
    "aux": list,
    "targets": list,
    "config": dict,
    "seeds": list,
    "learning_type": str,
    "metric_variants": dict,
}
_RECORD = {"seed": int, "target": str, "category": str, "n_images": int, "metrics": dict}
_IMAGE = {"seed": int, "leg": str, "target": str, "category": str, "path": str, "defect": str, "label": int}
_FIT = {"seed": int, "leg": str, "checkpoint": str}
_TYPE_NAMES = {str: "a string", list: "a list", dict: "an object", int: "an integer", bool: "true/false"}


def _is(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _check_fields(entry: Any, spec: dict[str, type], where: str, source: Path | str) -> None:
    if not isinstance(entry, dict):
        raise ZsadError(f"{source}: {where} is not an object; re-run or restore the file")
    for key, kind in spec.items():
        if key not in entry:
            raise ZsadError(f"{source}: {where} lacks '{key}'; re-run or restore the file")
        if not _is(entry[key], kind):
            raise ZsadError(
                f"{source}: {where}.{key} = {entry[key]!r} is not {_TYPE_NAMES[kind]}; re-run or restore the file"
            )


def validate(data: Any, source: Path | str = "<memory>") -> dict[str, Any]:
    """Check a results document (v1 or v2) and return it; one-line ZsadError naming the bad entry.

    Metric values must be fractions in [0, 1] or null: a value such as 11.69 (a percentage typed in
    by hand) is refused rather than shown as 1169%.
    """
    if not isinstance(data, dict) or data.get("schema") not in READABLE_SCHEMAS:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise ZsadError(f"{source}: not a zsad-bench results file (schema {schema!r}, want {SCHEMA})")
    _check_fields(data, _HEADER, "the file", source)
    if not all(_is(s, int) for s in data["seeds"]):
        raise ZsadError(f"{source}: seeds = {data['seeds']!r} must be integers; re-run or restore the file")
    for name, spec in (("records", _RECORD), ("images", _IMAGE), ("fits", _FIT)):
        entries = data.get(name, [])
        if not isinstance(entries, list):
            raise ZsadError(f"{source}: '{name}' is not a list; re-run or restore the file")
        for i, entry in enumerate(entries):
            _check_fields(entry, spec, f"{name}[{i}]", source)
    for i, rec in enumerate(data.get("records", [])):
        for metric, value in rec["metrics"].items():
            if not _number(value) or (value is not None and not math.isnan(value) and not 0.0 <= value <= 1.0):
                raise ZsadError(
                    f"{source}: records[{i}].metrics.{metric} = {value!r} is not a fraction in [0, 1] (metrics are "
                    "stored as fractions, not percent); fix the value or re-run"
                )
    for i, img in enumerate(data.get("images", [])):
        if not _number(img.get("score")):
            raise ZsadError(f"{source}: images[{i}].score = {img.get('score')!r} is not a number; re-run")
        if img.get("label") not in (0, 1):
            raise ZsadError(
                f"{source}: images[{i}].label = {img.get('label')!r} is not 0 (good) or 1 (anomalous); re-run"
            )
    if not isinstance(data.get("complete", False), bool):
        raise ZsadError(f"{source}: complete = {data['complete']!r} is not true/false; re-run or restore the file")
    return data


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """v1 string keys (``checkpoint|leg|seed=N``, ``fit_s|...``, ``name|leg|seed=N``) -> fit records."""
    data = dict(data)
    artifacts = data.pop("artifacts", {}) or {}
    summary = data.pop("summary", {}) or {}
    timings = dict(data.get("timings", {}) or {})
    fits = []
    for key, path in artifacts.items():
        kind, _, rest = key.partition("|")
        leg, _, seed = rest.rpartition("|seed=")
        if kind != "checkpoint" or not seed.lstrip("-").isdigit():
            continue
        suffix = f"|{leg}|seed={seed}"
        seconds = timings.pop(f"fit_s{suffix}", 0.0)
        numbers = {k[: -len(suffix)]: v for k, v in summary.items() if k.endswith(suffix)}
        fits.append({"seed": int(seed), "leg": leg, "checkpoint": path, "seconds": seconds, "summary": numbers})
    data["fits"] = fits
    data["timings"] = timings
    data["images"] = []
    return data
