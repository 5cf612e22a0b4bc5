"""Reading results files (schema v1 and v2), benchmark files and the papers' reported CSVs into long frames.

Every evaluation row carries, besides its number, what a table needs to place it: the leg it was measured
on (``protocol``), the table it belongs to (``table_key``: the target set, plus ``@k-shot`` for few-shot
runs), how a person would name its setting (``setting``, e.g. ``VisA -> MVTec AD``), its learning type,
whether it is a control (a floor, not a method) and whether its run finished (``complete``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from zsad_bench.errors import ZsadError
from zsad_bench.metrics import METRICS
from zsad_bench.results import (
    BENCH_SCHEMA,
    READABLE_SCHEMAS,
    RunResult,
    read_json,
    require_finite_scores,
    results_files,
)
from zsad_bench.tables.names import canonical_protocol, dataset_name, dataset_names, leg_setting, reported_target

BENCH_KEYS = ("method", "backbone", "device", "dtype", "batch_size", "component")
BENCH_VALUES = ("images_per_s", "p50_ms", "p95_ms", "peak_mem_mb")
LONG_COLUMNS = (
    *("protocol", "metric", "category", "method", "backbone", "seed", "target", "value", "source", "file"),
    *("table_key", "target_name", "setting", "learning_type", "control", "complete", "is_mean", "table"),
)
IMAGE_COLUMNS = ("file", "protocol", "seed", "category", "path", "defect", "label", "score")
REPORTED_COLUMNS = ("protocol", "metric", "category", "method", "value")
MEAN = "mean"  # the mean row's name in the papers' reported CSVs and in our CSV output (never a data category)


def reported_dir() -> Path:
    """Where the papers' reported figures are kept (CSV, values in percent)."""
    return Path(__file__).resolve().parents[1] / "reported"


def is_control(learning_type: str, method: str) -> bool:
    """Controls (floors such as a random scorer) are marked by learning type ``control`` or a ``control-`` name."""
    return str(learning_type) == "control" or str(method).startswith("control-")


# --------------------------------------------------------------------------------------------- files


def _read_json(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict) or data.get("schema") not in (*READABLE_SCHEMAS, BENCH_SCHEMA):
        schema = data.get("schema") if isinstance(data, dict) else None
        raise ZsadError(
            f"{path}: not a zsad-bench results or benchmark file (schema {schema!r}); pass only files written by "
            "`zsad-bench run` or `zsad-bench bench`"
        )
    return data


def _load_run(path: Path, data: dict) -> tuple[RunResult, list[Mapping[str, Any]]]:
    """The run and its per-image records (schema v2 ``images``; v1 files have none) of ``data``, read from ``path``.

    Built through :meth:`RunResult.from_json`, so its validation (schema, fractions in [0, 1]) applies here too.
    """
    try:
        run = RunResult.from_json(data, path)
        images = [vars(r) for r in run.images]
        run.long_rows()  # every record readable
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # hand-edited files: one line, no traceback
        raise ZsadError(f"{path}: malformed results file ({type(exc).__name__}: {exc}); re-run or remove it") from None
    if not isinstance(images, list):
        raise ZsadError(f"{path}: 'images' is not a list of per-image records; re-run or remove it")
    return run, images


def _bench_rows(doc: Mapping[str, Any], source: str) -> list[dict]:
    """The validated rows of one ``zsad-bench/bench/v1`` document."""
    if not isinstance(doc.get("rows"), list):
        raise ZsadError(f"{source}: benchmark file has no 'rows' list; re-run `zsad-bench bench`")
    rows = []
    for i, row in enumerate(doc["rows"]):
        missing = [k for k in (*BENCH_KEYS, *BENCH_VALUES) if k not in row]
        if missing:
            raise ZsadError(f"{source}: benchmark row {i} lacks {', '.join(missing)}; re-run `zsad-bench bench`")
        overhead = row.get("overhead_vs_backbone")  # total rows: method + backbone time / backbone time - 1
        rows.append(
            {
                **{k: row[k] for k in (*BENCH_KEYS, *BENCH_VALUES)},
                "overhead": math.nan if overhead is None else float(overhead),
                "file": source,
            }
        )
    return rows


def _shot_suffix(run_protocol: str) -> str:
    """``@k-shot`` of a few-shot run's protocol (``mvtec@1-shot``), kept on every leg so k=1 and k=2 differ."""
    return "@" + run_protocol.split("@", 1)[1] if "@" in run_protocol else ""


@dataclass
class Scan:
    """Everything read from results files: evaluation rows, benchmark rows and per-image records."""

    evals: pd.DataFrame
    bench: pd.DataFrame
    images: pd.DataFrame


def _eval_rows(run: RunResult, path: Path) -> list[dict]:
    suffix = _shot_suffix(run.protocol)
    control = is_control(run.learning_type, run.method)
    targets_of: dict[str, set[str]] = {}
    for r in run.records:
        targets_of.setdefault(r.protocol or run.protocol, set()).add(r.target)
    rows = []
    for r in run.long_rows():
        leg = r["protocol"]
        protocol = canonical_protocol(leg if "@" in leg else leg + suffix)
        targets = sorted(targets_of[leg])
        shots = _shot_suffix(protocol)
        rows.append(
            {
                **r,
                "protocol": protocol,
                "source": "measured",
                "file": str(path),
                "table_key": "+".join(targets) + shots,
                "target_name": " + ".join(dataset_name(t) for t in targets) + (f", {shots[1:]}" if shots else ""),
                "setting": leg_setting(protocol, "control" if control else run.learning_type),
                "learning_type": "control" if control else run.learning_type,
                "control": control,
                "complete": bool(run.complete),
                "is_mean": False,
                "table": "",
            }
        )
    return rows


def scan(paths: Sequence[Path | str]) -> Scan:
    """Read files and directories of JSON files (results v1/v2 and benchmark files)."""
    eval_rows: list[dict] = []
    bench_rows: list[dict] = []
    image_rows: list[dict] = []
    for path in results_files(paths):
        data = _read_json(path)
        if data["schema"] == BENCH_SCHEMA:
            bench_rows += _bench_rows(data, str(path))
            continue
        run, images = _load_run(path, data)
        require_finite_scores(images, path)
        eval_rows += _eval_rows(run, path)
        suffix = _shot_suffix(run.protocol)
        for i, rec in enumerate(images):
            try:
                leg = str(rec["leg"])
                row = {
                    "file": str(path),
                    "protocol": canonical_protocol(leg if "@" in leg else leg + suffix),
                    "seed": int(rec["seed"]),
                    "category": str(rec["category"]),
                    "path": str(rec["path"]),
                    "defect": str(rec.get("defect", "")),
                    "label": int(rec["label"]),
                    "score": float(rec["score"]),
                }
            except (KeyError, TypeError, ValueError) as exc:
                raise ZsadError(f"{path}: per-image record {i} is malformed ({exc!r}); re-run or remove it") from None
            image_rows.append(row)
    frame = pd.DataFrame(eval_rows, columns=list(LONG_COLUMNS))
    frame["value"] = frame["value"].astype(float)
    for col in ("control", "complete", "is_mean"):
        frame[col] = frame[col].astype(bool)
    bench = pd.DataFrame(bench_rows, columns=[*BENCH_KEYS, *BENCH_VALUES, "overhead", "file"])
    return Scan(frame, bench, pd.DataFrame(image_rows, columns=list(IMAGE_COLUMNS)))


def scan_results(paths: Sequence[Path | str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(evaluation long frame, benchmark rows) from files and directories of JSON files."""
    found = scan(paths)
    return found.evals, found.bench


def load_results(paths: Sequence[Path | str]) -> pd.DataFrame:
    """Long frame (values as fractions, ``source`` "measured") of the evaluation results in ``paths``.

    ``paths`` are results files or directories (their ``*.json``); benchmark files are skipped here
    (see :func:`load_bench`).
    """
    return scan(paths).evals


def load_bench(paths: Sequence[Path | str]) -> pd.DataFrame:
    """Rows of the ``zsad-bench/bench/v1`` files in ``paths`` (one per method/backbone/dtype/batch/component)."""
    return scan(paths).bench


def load_reported(directory: Path | None = None) -> pd.DataFrame:
    """The papers' reported figures as a long frame (fractions, ``source`` "reported").

    Files named ``*_main_table.csv`` hold main-table figures (no category column: the mean row); the others
    per-category figures, where category ``mean`` is the paper's mean row. A ``table`` column says which
    ("main" or "per_category"). Optional columns ``backbone`` and ``learning_type`` describe the column in the
    table footnotes; other extra columns (``source``, ``aupro_definition``, notes) are allowed and ignored
    here. A reported protocol without ``-to-`` (training-free, or ``@k-shot``) has no auxiliary set and is
    never filed under a cross-dataset leg.
    """
    directory = reported_dir() if directory is None else directory
    frames = []
    for path in sorted(directory.glob("*.csv")):
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
            raise ZsadError(f"{path}: unreadable reported CSV ({exc}); fix or remove it") from None
        if "category" not in df:
            df["category"] = MEAN
        missing = set(REPORTED_COLUMNS) - set(df.columns)
        if missing:
            raise ZsadError(f"{path}: reported CSV lacks column(s) {', '.join(sorted(missing))}")
        unknown = sorted(set(df["metric"]) - set(METRICS))
        if unknown:
            raise ZsadError(f"{path}: unknown metric(s) {', '.join(unknown)}; use the names in zsad_bench.metrics")
        values = pd.to_numeric(df["value"], errors="coerce")
        bad = values.isna() | (values < 0) | (values > 100)
        if bad.any():
            line = int(bad.to_numpy().nonzero()[0][0]) + 2
            raise ZsadError(
                f"{path}: line {line}: value {df['value'].iloc[line - 2]!r} is not a percentage in [0, 100]"
            )
        out = df[list(REPORTED_COLUMNS)].copy()
        out["value"] = values / 100.0
        out["protocol"] = out["protocol"].map(canonical_protocol)
        out["backbone"] = df.get("backbone", "")
        out["seed"] = math.nan
        out["target"] = ""
        out["source"] = "reported"
        out["file"] = str(path)
        kinds_shots = [reported_target(p) for p in out["protocol"]]
        out["table_key"] = [f"reported:{k}" + (f"@{s}" if s else "") for k, s in kinds_shots]
        out["target_name"] = [dataset_names(k) + (f", {s}" if s else "") for k, s in kinds_shots]
        lt = df["learning_type"] if "learning_type" in df else pd.Series("", index=df.index)
        out["setting"] = [leg_setting(p, t) for p, t in zip(out["protocol"], lt, strict=True)]
        out["learning_type"] = lt.to_numpy()
        out["control"] = False
        out["complete"] = True
        out["is_mean"] = out["category"].str.lower() == MEAN
        out["table"] = "main" if path.stem.endswith("_main_table") else "per_category"
        frames.append(out)
    if not frames:
        raise ZsadError(
            f"{directory}: no reported CSV files; reinstall zsad-bench (its reported figures ship as package data)"
        )
    return pd.concat(frames, ignore_index=True)
