"""The table model: rows placed in tables and columns, their cells, and bootstrap intervals / paired tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from zsad_bench.errors import ZsadError
from zsad_bench.metrics import METRICS, PIXEL_METRICS
from zsad_bench.tables import bootstrap
from zsad_bench.tables.aggregate import REPORTED_SUFFIX, cells, column_info, evaluated
from zsad_bench.tables.aggregate import prepare as place


@dataclass
class Model:
    """Placed rows, their cells and per-column facts, shared by the renderers."""

    rows: pd.DataFrame
    cells: pd.DataFrame
    info: dict[tuple[str, str], dict[str, Any]]  # (table, column) -> column_info row
    done: set[tuple[str, str, str]]
    titles: dict[str, str]
    hidden_controls: int
    ci: dict[tuple, tuple[float, float]]
    ci_requested: bool = False
    maskless: frozenset[str] = frozenset()

    def col(self, key: str, column: str) -> Mapping[str, Any]:
        return self.info[(key, column)]

    def order(self, key: str, columns: Sequence[str]) -> list[str]:
        """Measured methods alphabetically, then reported ones in the papers' order, then controls."""
        unique = list(dict.fromkeys(columns))
        control = {c for c in unique if self.col(key, c)["control"]}
        real = [c for c in unique if c not in control]
        return [
            *sorted(c for c in real if not c.endswith(REPORTED_SUFFIX)),
            *[c for c in real if c.endswith(REPORTED_SUFFIX)],
            *sorted(control),
        ]

    def n_evaluated(self, key: str, column: str) -> int:
        return sum(1 for t, c, _ in self.done if t == key and c == column)

    def n_rows(self, key: str, metric: str) -> int:
        """Category rows of the (table, metric) per-category table."""
        sub = self.cells[(self.cells["table_key"] == key) & (self.cells["metric"] == metric) & ~self.cells["is_mean"]]
        return sub["category"].nunique()


def build(
    df: pd.DataFrame,
    *,
    metrics: Sequence[str] | None = None,
    columns: str = "method",
    controls: bool = False,
    ci: float | None = None,
    n_boot: int = 1000,
    ci_seed: int = 0,
    images: pd.DataFrame | None = None,
) -> Model:
    """Place rows in tables and columns, aggregate their cells and, with ``ci``, bootstrap their intervals."""
    if metrics:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ZsadError(f"--metric {', '.join(unknown)}: unknown; choose from {', '.join(METRICS)}")
    if df.empty:
        raise ZsadError("no results to tabulate (check the files and --metric)")
    hidden = 0 if controls else int(df.loc[df["control"], ["file"]].drop_duplicates().shape[0])
    if not controls and df["control"].all():
        raise ZsadError("only control runs given; pass --controls to show them")
    rows = place(df, columns, controls)
    done = evaluated(rows)
    measured = rows[rows["source"] == "measured"]
    with_pixels = set(measured.loc[measured["metric"].isin(PIXEL_METRICS), "table_key"])
    maskless = frozenset(set(measured["table_key"]) - with_pixels)
    if metrics:
        rows = rows[rows["metric"].isin(list(metrics))]
    if rows.empty:
        raise ZsadError("no results to tabulate (check the files and --metric)")
    titles = dict(zip(rows["table_key"], rows["title"], strict=True))
    model = Model(
        rows,
        cells(rows, done),
        {(r["table_key"], r["column"]): r for r in column_info(rows).to_dict("records")},
        done,
        titles,
        hidden,
        {},
        maskless=maskless,
    )
    if ci is not None:
        model.ci = intervals(model, images, ci, n_boot, ci_seed)
        model.ci_requested = True
    return model


def _column_images(model: Model, images: pd.DataFrame | None) -> dict[tuple[str, str], pd.DataFrame]:
    """Per-image records of every measured column, matched through (file, leg)."""
    if images is None or images.empty:
        return {}
    measured = model.rows[model.rows["source"] == "measured"]
    out = {}
    for (key, column), sub in measured.groupby(["table_key", "column"]):
        legs = set(zip(sub["file"], sub["protocol"], strict=True))
        mine = images[[(f, p) in legs for f, p in zip(images["file"], images["protocol"], strict=True)]]
        if not mine.empty:
            out[(key, column)] = mine
    return out


def intervals(
    model: Model, images: pd.DataFrame | None, level: float, n_boot: int, seed: int
) -> dict[tuple, tuple[float, float]]:
    """Bootstrap intervals keyed like cells: (table, metric, category, is_mean, column) -> (low, high)."""
    if not 0 < level < 100:
        raise ZsadError(f"--ci {level:g}: give a confidence level in percent, between 0 and 100 (e.g. 95)")
    if n_boot < 10:
        raise ZsadError(f"--bootstrap {n_boot}: use at least 10 replicates (1000 is usual)")
    out = {}
    wanted = [m for m in bootstrap.CI_METRICS if m in set(model.rows["metric"])]
    for (key, column), imgs in _column_images(model, images).items():
        groups = bootstrap.strata(imgs, f"{', '.join(sorted(set(imgs['file'])))}")
        for metric in wanted:
            for category, values in bootstrap.replicates(groups, metric, n_boot, seed).items():
                out[(key, metric, category, category == "", column)] = bootstrap.interval(values, level)
    return out


def paired_tests(model: Model, images: pd.DataFrame | None, level: float, n_boot: int, seed: int) -> list:
    """A paired bootstrap test for each table holding exactly two measured methods with per-image records."""
    found = _column_images(model, images)
    by_table: dict[str, list[str]] = {}
    for key, column in found:
        if not model.col(key, column)["control"]:
            by_table.setdefault(key, []).append(column)
    results = []
    for key, cols in by_table.items():
        if len(cols) != 2:
            raise ZsadError(
                f"--paired compares two runs on the same targets; {model.titles[key]} has {len(cols)} with per-image "
                f"records ({', '.join(sorted(cols))}); pass two"
            )
        a, b = sorted(cols)
        if bootstrap.image_paths(found[(key, a)]) != bootstrap.image_paths(found[(key, b)]):
            raise ZsadError(f"--paired: {a} and {b} were scored on different images of {model.titles[key]}")
        groups = [bootstrap.strata(found[(key, c)], c) for c in (a, b)]
        results.append((key, bootstrap.paired(groups[0], groups[1], (a, b), level, n_boot, seed)))
    if not results:
        raise ZsadError("--paired needs two runs on the same targets whose files hold per-image records (schema v2)")
    return results
