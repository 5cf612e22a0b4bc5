"""Tolerant reading of results files for figures: v1 and v2 schemas, per-image records when present.

Figures read the JSON directly (not :class:`zsad_bench.results.RunResult`) so that files of either schema
version load; ``images`` is ``[]`` for v1 files (then only category-level figures can be drawn).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zsad_bench.errors import ZsadError
from zsad_bench.results import BENCH_SCHEMA, RunResult, read_json, require_finite_scores, results_files


@dataclass(eq=False)
class Run:
    """One results file: its raw JSON, the display label and the per-image and per-category records."""

    path: Path
    data: dict[str, Any]
    label: str
    images: list[dict[str, Any]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.data.get("method", ""))

    @property
    def learning_type(self) -> str:
        return str(self.data.get("learning_type", ""))

    @property
    def protocol(self) -> str:
        return str(self.data.get("protocol", ""))

    @property
    def config(self) -> dict[str, Any]:
        return self.data.get("config") or {}

    def categories(self) -> list[str]:
        """Categories in the order they were evaluated."""
        return list(dict.fromkeys(r["category"] for r in self.records))

    @property
    def seeds(self) -> list[int]:
        """Seeds in the order they were evaluated."""
        return list(dict.fromkeys(int(r["seed"]) for r in self.records))

    def images_of(self, category: str, seed: int | None = None, leg: str | None = None) -> list[dict[str, Any]]:
        """Per-image records of ``category`` (first seed and leg evaluated on it unless given)."""
        rows = [r for r in self.images if r["category"] == category]
        if rows:
            seed = rows[0]["seed"] if seed is None else seed
            leg = rows[0]["leg"] if leg is None else leg
        return [r for r in rows if r["seed"] == seed and r["leg"] == leg]

    def metric(self, category: str, metric: str, leg: str | None = None) -> float:
        """Mean over seeds of ``metric`` on ``category`` (NaN when absent)."""
        vals = [
            _num(r["metrics"].get(metric))
            for r in self.records
            if r["category"] == category and (leg is None or r.get("protocol") == leg)
        ]
        vals = [v for v in vals if math.isfinite(v)]
        return sum(vals) / len(vals) if vals else math.nan


def pick_seeds(runs: Sequence[Run], seed: int | None = None) -> dict[Run, int | None]:
    """The seed each run is drawn with: ``seed``, which every run must have, or else the run's first seed
    (None for a run without records)."""
    for r in runs:
        if seed is not None and seed not in r.seeds:
            has = ", ".join(map(str, r.seeds)) or "none"
            raise ZsadError(f"{r.path}: --seed {seed}: this run has no seed {seed}; its seeds are {has}")
    return {r: seed if seed is not None else next(iter(r.seeds), None) for r in runs}


def seed_note(runs: Sequence[Run], chosen: dict[Run, int | None]) -> str:
    """Which seed is drawn, ``seed 0 of 0, 1, 2`` (per run when the runs differ); empty when no run has several."""
    if all(len(r.seeds) < 2 for r in runs):
        return ""
    notes = {
        r.label: f"seed {chosen[r]}" + (f" of {', '.join(map(str, r.seeds))}" if len(r.seeds) > 1 else "")
        for r in runs
        if chosen[r] is not None
    }
    if len(set(notes.values())) == 1:
        return next(iter(notes.values()))
    return "; ".join(f"{label}: {note}" for label, note in notes.items())


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def load_runs(paths: list[Path | str]) -> list[Run]:
    """Every evaluation results file under ``paths`` (benchmark files are skipped); labels made unique."""
    runs = []
    for path in results_files(paths):
        raw = read_json(path)
        if isinstance(raw, dict) and raw.get("schema") == BENCH_SCHEMA:
            continue
        data = RunResult.from_json(raw, path).to_json()  # validated (fractions, types), v1 upgraded to v2
        require_finite_scores(data.get("images") or [], path)  # a null score would break every curve
        label = str(data.get("method_label") or data.get("method") or path.stem)
        runs.append(Run(path, data, label, list(data.get("images") or []), list(data.get("records") or [])))
    if not runs:
        raise ZsadError(f"{', '.join(map(str, paths))}: no evaluation results files found")
    _unique_labels(runs)
    return runs


def _unique_labels(runs: list[Run]) -> None:
    """Runs sharing a label get the config values that tell them apart (``SPG sae_k=16``) or their file stem."""
    by_label: dict[str, list[Run]] = {}
    for r in runs:
        by_label.setdefault(r.label, []).append(r)
    for label, group in by_label.items():
        if len(group) < 2:
            continue
        flat = [flat_config(r) for r in group]
        keys = sorted({k for f in flat for k in f if len({json.dumps(g.get(k), default=str) for g in flat}) > 1})
        for r, f in zip(group, flat, strict=True):
            extra = " ".join(f"{k.split('.')[-1]}={f.get(k)}" for k in keys[:3]) or r.path.stem
            r.label = f"{label} {extra}"
        seen: dict[str, int] = {}
        for r in group:  # still equal (same config, e.g. repeated runs): number them
            seen[r.label] = seen.get(r.label, 0) + 1
            if seen[r.label] > 1:
                r.label = f"{r.label} #{seen[r.label]}"


CONFIG_KEYS_RUN = ("backbone", "image_size", "shots", "eval_size")


def flat_config(run: Run) -> dict[str, Any]:
    """Method options (``method.X``) plus the run options an ablation varies (backbone, image size, shots)."""
    cfg = run.config
    out = {f"method.{k}": _hashable(v) for k, v in (cfg.get("method") or {}).items()}
    run_cfg = cfg.get("run") or {}
    for k in CONFIG_KEYS_RUN:
        if k in run_cfg:
            out[f"run.{k}"] = _hashable(run_cfg[k])
    out.setdefault("run.backbone", run.data.get("backbone"))
    return out


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v
