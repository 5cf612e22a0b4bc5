"""Markdown, LaTeX and CSV renderers: per-category tables, the main table, run summaries and speed tables.

Values live as fractions and show as percentages with one decimal; the best real method of each row
(per-category tables) or column (main table) is bold; controls are never bold and come last. Footnotes
under each table name every column's setting and backbone and explain every mark a cell can carry.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from zsad_bench.errors import ZsadError
from zsad_bench.metrics import METRICS, PIXEL_METRICS
from zsad_bench.tables import bootstrap
from zsad_bench.tables.aggregate import INCOMPLETE_MARK, REPORTED_SUFFIX, main_cells
from zsad_bench.tables.load import BENCH_VALUES, MEAN, _bench_rows
from zsad_bench.tables.model import Model, build, paired_tests
from zsad_bench.tables.text import (
    NO_MASKS,
    PARTIAL_MARK,
    SUBSET_MARK,
    CellText,
    best_mask,
    escape,
    fmt_cell,
    grid_text,
    percent_text,
    prose,
)

FORMATS = ("md", "latex", "csv")
CSV_COLUMNS = ("protocol", "metric", "category", "method", "value")
SUMMARY_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "aupro", "aupro_cflow")


# ----------------------------------------------------------------------------------------------- tables


def _lookup(cells_: pd.DataFrame) -> dict[tuple, Any]:
    return {(r.category, r.is_mean, r.column): r for r in cells_.itertuples()}


def _cell(
    model: Model, key: str, metric: str, cat: str, is_mean: bool, column: str, r: Any, fmt: str, bold: bool
) -> str:
    if r is None:
        return fmt_cell(math.nan, 0, 0, fmt, False)
    info = model.col(key, column)
    partial = bool(
        is_mean
        and info["source"] == "measured"
        and not r.no_masks
        and metric in PIXEL_METRICS
        and 0 < r.n_categories < model.n_evaluated(key, column)
    )
    subset = bool(
        is_mean
        and info["source"] == "measured"
        and info["complete"]
        and not r.no_masks
        and model.n_evaluated(key, column) < model.n_rows(key, metric)
    )
    extra = CellText(model.ci.get((key, metric, cat, is_mean, column)), bool(r.no_masks), partial, subset)
    return fmt_cell(r.mean, r.std, r.n, fmt, bold, extra)


def _notes(model: Model, key: str, metric: str, cols: Sequence[str], body: list[list[str]], fmt: str) -> list[str]:
    """Footnotes: each column's setting and backbone, and every mark that appears in the table."""

    def esc(text: str) -> str:
        return prose(text, fmt)

    notes = []
    described = []
    for c in cols:
        info = model.col(key, c)
        if info["source"] == "reported":
            described.append(f"{c}: {info['setting']}" + (f", backbone {info['backbone']}" if info["backbone"] else ""))
            continue
        seeds = info["seeds"]
        lt = info["learning_type"]
        setting = info["setting"] if info["setting"] == lt else f"{lt}, {info['setting']}"
        described.append(f"{c}: {setting}, backbone {info['backbone']}, seed{'s' if len(seeds) > 1 else ''} "
                         f"{', '.join(map(str, seeds))}")  # fmt: skip
    notes.append(esc("Columns: " + "; ".join(described) + "."))
    text = " ".join(" ".join(row) for row in body) + " ".join(cols)
    incomplete = [c for c in cols if not model.col(key, c)["complete"]]
    if incomplete:
        files = sorted({f for c in incomplete for f in model.col(key, c)["files"]})
        notes.append(
            esc(
                f"{INCOMPLETE_MARK} interrupted run ({', '.join(files)}): only the categories it finished are shown "
                "and its means cover those only; finish it with zsad-bench run ... --resume."
            )
        )
    if NO_MASKS in text:
        notes.append(esc(f"{NO_MASKS}: the category has no ground-truth masks, so its pixel metrics are absent "
                         "(not averaged into the mean)."))  # fmt: skip
    if PARTIAL_MARK in text or r"\ddagger" in text:
        notes.append(esc(f"{PARTIAL_MARK} mean over the categories with masks only."))
    if SUBSET_MARK in text or r"^\S" in text:
        notes.append(
            esc(f"{SUBSET_MARK} mean over the categories this run evaluated, not over every row of the table.")
        )
    if key in model.maskless:
        notes.append(esc("No pixel metrics: none of these targets has ground-truth masks (image labels only)."))
    if model.ci_requested and metric in bootstrap.CI_METRICS:
        with_ci = [c for c in cols if any(k[0] == key and k[4] == c for k in model.ci)]
        without = [c for c in cols if c not in with_ci]
        note = "[low, high]: bootstrap confidence interval (images resampled within each category and label)."
        if without:
            note += (
                f" No interval for {', '.join(without)}: no per-image records (results schema v1 or reported), or "
                "only one class of images in a category."
            )
        notes.append(esc(note))
    controls = [c for c in cols if model.col(key, c)["control"]]
    if controls:
        notes.append(esc(f"Controls (floors, never marked best): {', '.join(controls)}."))
    return notes


def _margin_note(
    model: Model, key: str, metric: str, cols: Sequence[str], look: Mapping[tuple, Any], fmt: str
) -> str | None:
    """How far the best measured method's mean lies above the best control's (in points), when both are shown."""
    means = {c: look.get(("", True, c)) for c in cols}
    real = [r.mean for c, r in means.items() if r is not None and not model.col(key, c)["control"]
            and model.col(key, c)["source"] == "measured" and math.isfinite(r.mean)]  # fmt: skip
    floor = [
        r.mean for c, r in means.items() if r is not None and model.col(key, c)["control"] and math.isfinite(r.mean)
    ]
    if not real or not floor:
        return None
    margin = 100 * (max(real) - max(floor))
    text = f"Best measured method minus best control on the mean {metric}: {margin:+.1f} points."
    return prose(text, fmt)


def _per_category_tables(model: Model, fmt: str) -> list[str]:
    out = []
    for (key, metric), sub in sorted(
        model.cells.groupby(["table_key", "metric"]), key=lambda kv: (model.titles[kv[0][0]], kv[0][1])
    ):
        cols = model.order(key, sub["column"])
        categories = sorted({c for c in sub.loc[~sub["is_mean"], "category"]}, key=lambda c: (c.lower(), c))
        collide = any(c.strip().lower() == MEAN for c in categories)
        look = _lookup(sub)
        eligible = [not model.col(key, c)["control"] for c in cols]
        body = []
        for cat, is_mean in [*((c, False) for c in categories), ("", True)]:
            found = [look.get((cat, is_mean, c)) for c in cols]
            best = best_mask([r.mean if r is not None and not r.no_masks else None for r in found], eligible)
            texts = [
                _cell(model, key, metric, cat, is_mean, c, r, fmt, b) for c, r, b in zip(cols, found, best, strict=True)
            ]
            name = ("Mean over categories" if collide else "Mean") if is_mean else escape(cat, fmt)
            body.append([name, *texts])
        header = ["Category", *(escape(c, fmt) for c in cols)]
        title = prose(f"{model.titles[key]} - {metric} (%): {METRICS[metric]}", fmt)
        notes = _notes(model, key, metric, cols, body, fmt)
        margin = _margin_note(model, key, metric, cols, look, fmt)
        out.append(grid_text(title, header, body, fmt, [len(body) - 1], notes + ([margin] if margin else [])))
    return out


def _main_table(model: Model, cells_: pd.DataFrame, fmt: str) -> str:
    pairs = sorted({(k, m) for k, m in zip(cells_["table_key"], cells_["metric"], strict=True)},
                   key=lambda km: (model.titles[km[0]], km[1]))  # fmt: skip
    control = {c for (_, c), info in model.info.items() if info["control"]}
    labels = list(dict.fromkeys(cells_["column"]))
    real = [c for c in labels if c not in control]
    methods = [
        *sorted(c for c in real if not c.endswith(REPORTED_SUFFIX)),
        *[c for c in real if c.endswith(REPORTED_SUFFIX)],
        *sorted(c for c in labels if c in control),
    ]
    lookup = {(r.table_key, r.metric, r.column): r for r in cells_.itertuples()}
    grid = [[lookup.get((k, m, c)) for k, m in pairs] for c in methods]
    eligible = [c not in control for c in methods]
    best_by_col = [
        best_mask([row[j].mean if row[j] is not None and not row[j].no_masks else None for row in grid], eligible)
        for j in range(len(pairs))
    ]
    body = []
    for i, c in enumerate(methods):
        texts = [_cell(model, k, m, "", True, c, grid[i][j], fmt, best_by_col[j][i]) for j, (k, m) in enumerate(pairs)]
        body.append([escape(c, fmt), *texts])
    header = ["Method", *(escape(f"{model.titles[k]} {m}", fmt) for k, m in pairs)]
    title = "Main table: mean over categories (%), " + "; ".join(
        f"{m} = {METRICS[m]}" for m in sorted({m for _, m in pairs})
    )
    rules = [methods.index(c) for c in methods if c in control][:1]
    notes = []
    if any(INCOMPLETE_MARK in c for c in methods):
        notes.append(prose(f"{INCOMPLETE_MARK} interrupted run: means over the categories it finished.", fmt))
    if any(NO_MASKS in t for row in body for t in row):
        notes.append(prose(f"{NO_MASKS}: the targets have no ground-truth masks.", fmt))
    if any(PARTIAL_MARK in t or r"\ddagger" in t for row in body for t in row):
        notes.append(prose(f"{PARTIAL_MARK} mean over the categories with masks only.", fmt))
    if any(SUBSET_MARK in t or r"^\S" in t for row in body for t in row):
        notes.append(
            prose(f"{SUBSET_MARK} mean over the categories that run evaluated, fewer than its table's rows.", fmt)
        )
    if control & set(methods):
        notes.append(escape("Rows after the methods are controls (floors, never marked best).", fmt))
    return grid_text(prose(title, fmt), header, body, fmt, rules, notes)


def _long_csv(model: Model) -> str:
    clash = sorted({c for c in model.cells.loc[~model.cells["is_mean"], "category"] if c.strip().lower() == MEAN})
    if clash:
        raise ZsadError(
            f"--format csv: category '{clash[0]}' would read as the CSV's mean row (category '{MEAN}'); "
            "use --format md or latex for these results"
        )
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *(("ci_low", "ci_high") if model.ci_requested else ())])
    # each column's own leg (a table may hold several: a zero-shot and a training-free run on MVTec AD)
    leg = model.rows.groupby(["table_key", "column"])["protocol"].first()
    ordered = model.cells.assign(
        title=[leg[(k, c)] for k, c in zip(model.cells["table_key"], model.cells["column"], strict=True)]
    )
    ordered = ordered.sort_values(["title", "metric", "is_mean", "category", "column"])
    for r in ordered.itertuples():
        if math.isfinite(r.mean):
            row = [r.title, r.metric, MEAN if r.is_mean else r.category, r.column, percent_text(r.mean)]
            if model.ci_requested:
                ci = model.ci.get((r.table_key, r.metric, r.category, r.is_mean, r.column))
                row += [percent_text(ci[0]), percent_text(ci[1])] if ci else ["", ""]
            writer.writerow(row)
    return buf.getvalue()


def _paired_text(model: Model, results: list, level: float, n_boot: int, seed: int, fmt: str) -> str:
    header = ["Targets", "A", "B", "A - B (points)", f"{level:g}% interval", "p", "images", "categories"]
    body = [
        [
            escape(model.titles[key], fmt),
            escape(r.a, fmt),
            escape(r.b, fmt),
            f"{100 * r.difference:+.1f}",
            f"[{100 * r.low:+.1f}, {100 * r.high:+.1f}]",
            f"{r.p_value:.3f}",
            str(r.n_images),
            str(r.n_categories),
        ]
        for key, r in results
    ]
    title = (
        f"Paired bootstrap test of mean image AUROC ({n_boot} replicates stratified by category, seed {seed}; "
        "the same images resampled for both runs)"
    )
    return grid_text(prose(title, fmt), [escape(h, fmt) for h in header], body, fmt, [], [])


def render(
    df: pd.DataFrame,
    fmt: str = "md",
    *,
    metrics: Sequence[str] | None = None,
    columns: str = "method",
    main: bool = True,
    controls: bool = False,
    allow_incomplete: bool = False,
    ci: float | None = None,
    n_boot: int = 1000,
    ci_seed: int = 0,
    images: pd.DataFrame | None = None,
    paired: bool = False,
) -> str:
    """Per-category tables (one per target set and metric) and, with ``main``, the main table.

    ``df`` is a long frame from :func:`load_results` (plus :func:`load_reported` rows if wanted); ``images``
    its per-image records (:func:`scan`), needed for ``ci`` (a level in percent: bootstrap intervals of image
    AUROC/AP) and ``paired`` (a paired bootstrap test between the two runs of a table). ``fmt``: ``md``,
    ``latex`` (booktabs) or ``csv`` (long form ``protocol,metric,category,method,value`` in percent, category
    ``mean`` for the mean row; no main table). Interrupted runs are refused in LaTeX and CSV unless
    ``allow_incomplete``; controls are shown only with ``controls``.
    """
    if fmt not in FORMATS:
        raise ZsadError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt in ("latex", "csv") and not allow_incomplete:
        unfinished = sorted(set(df.loc[(df["source"] == "measured") & ~df["complete"].astype(bool), "file"]))
        if unfinished:
            raise ZsadError(
                f"{unfinished[0]}: run is incomplete (interrupted); finish it with `zsad-bench run ... --resume` "
                "or pass --allow-incomplete to print it marked"
            )
    model = build(
        df, metrics=metrics, columns=columns, controls=controls, ci=ci, n_boot=n_boot, ci_seed=ci_seed, images=images
    )
    if fmt == "csv":
        if paired:
            raise ZsadError("--paired prints a table of its own; use --format md or latex")
        return _long_csv(model)
    parts = _per_category_tables(model, fmt)
    if main:
        parts.append(_main_table(model, main_cells(model.rows, model.done), fmt))
    if paired:
        level = 95.0 if ci is None else ci
        parts.append(
            _paired_text(model, paired_tests(model, images, level, n_boot, ci_seed), level, n_boot, ci_seed, fmt)
        )
    if fmt == "md" and (model.rows["source"] == "reported").any():
        parts.append("Columns marked (reported) are the papers' published figures, not measured here.\n")
    if model.hidden_controls and fmt == "md":
        parts.append(f"{model.hidden_controls} control run(s) hidden; show them with --controls.\n")
    return "\n".join(parts)


def render_summary(df: pd.DataFrame, fmt: str = "md", metrics: Sequence[str] = SUMMARY_METRICS) -> str:
    """Compact view of runs: per target set and method, rows = categories + Mean, columns = metrics."""
    model = build(df, columns="method", controls=True)
    cells_ = model.cells[model.cells["metric"].isin(list(metrics))]
    out = []
    for (key, column), sub in sorted(
        cells_.groupby(["table_key", "column"]), key=lambda kv: (model.titles[kv[0][0]], kv[0][1])
    ):
        present = [m for m in metrics if m in set(sub["metric"])]
        lookup = {(r.category, r.is_mean, r.metric): r for r in sub.itertuples()}
        categories = sorted(set(sub.loc[~sub["is_mean"], "category"]), key=lambda c: (c.lower(), c))
        collide = any(c.strip().lower() == MEAN for c in categories)
        body = []
        for cat, is_mean in [*((c, False) for c in categories), ("", True)]:
            texts = [
                _cell(model, key, m, cat, is_mean, column, lookup.get((cat, is_mean, m)), fmt, False) for m in present
            ]
            name = ("Mean over categories" if collide else "Mean") if is_mean else escape(cat, fmt)
            body.append([name, *texts])
        title = prose(f"{column} on {model.titles[key]} (%)", fmt)
        out.append(grid_text(title, ["Category", *present], body, fmt, [len(body) - 1], []))
    return "\n".join(out)


def render_bench(bench: pd.DataFrame | Sequence[Mapping[str, Any]], fmt: str = "md") -> str:
    """One speed table: rows method/backbone/dtype/batch/component (and device), the measured columns.

    ``bench`` is a frame from :func:`load_bench` or a list of ``zsad-bench/bench/v1`` documents.
    """
    if fmt not in FORMATS:
        raise ZsadError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if not isinstance(bench, pd.DataFrame):
        bench = pd.DataFrame([r for i, doc in enumerate(bench) for r in _bench_rows(doc, f"benchmark document {i}")])
    order = ["method", "backbone", "dtype", "batch_size", "component", "device"]
    bench = bench.sort_values(order, kind="stable")
    if "overhead" not in bench:
        bench = bench.assign(overhead=math.nan)
    header = [*order, *BENCH_VALUES, "overhead"]
    if fmt == "csv":
        return bench[header].to_csv(index=False, lineterminator="\n")
    digits = {"images_per_s": 1, "p50_ms": 1, "p95_ms": 1, "peak_mem_mb": 0}
    body = []
    for r in bench.itertuples():
        keys = [str(getattr(r, k)) for k in order]
        vals = [f"{float(getattr(r, k)):.{digits[k]}f}" for k in BENCH_VALUES]
        pct = "%" if fmt == "md" else r"\%"
        vals.append(f"{100 * r.overhead:+.1f}{pct}" if math.isfinite(r.overhead) else "")
        body.append([escape(x, fmt) for x in keys] + vals)
    title = (
        "Speed: images per second, latency percentiles (ms), peak memory (MB) and the method's overhead "
        "(total time / backbone time - 1)"
    )
    return grid_text(prose(title, fmt), [escape(h, fmt) for h in header], body, fmt, [], [])
