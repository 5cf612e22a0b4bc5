"""Result tables from saved results files: per-category tables (like the SPG appendix, Tables S1-S8),
a main table (protocols x metrics, like its Table 1) and speed tables, as Markdown, LaTeX or CSV.

All values live as fractions in the long frame and are shown as percentages with one decimal; the
best value of each row (per-category tables) or column (main table) is bold. Reported figures from
papers (``results/reported/*.csv``) are added only on request and always carry "(reported)".
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from zsad_bench.errors import ZsadError
from zsad_bench.metrics import METRICS
from zsad_bench.results import SCHEMA as RESULTS_SCHEMA
from zsad_bench.results import RunResult

BENCH_SCHEMA = "zsad-bench/bench/v1"
BENCH_KEYS = ("method", "backbone", "device", "dtype", "batch_size", "component")
BENCH_VALUES = ("images_per_s", "p50_ms", "p95_ms", "peak_mem_mb")
LONG_COLUMNS = ("protocol", "metric", "category", "method", "backbone", "seed", "target", "value", "source", "file")
CSV_COLUMNS = ("protocol", "metric", "category", "method", "value")
FORMATS = ("md", "latex", "csv")
REPORTED_SUFFIX = " (reported)"
MEAN = "mean"


def canonical_protocol(name: str) -> str:
    """Protocol names compare with ``_`` and ``-`` alike (``visa_to_mvtec`` == ``visa-to-mvtec``)."""
    return str(name).strip().replace("_", "-")


def reported_dir() -> Path:
    """Where the papers' reported figures are kept (CSV, values in percent)."""
    return Path(__file__).resolve().parent / "reported"


def _expand(paths: Sequence[Path | str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise ZsadError(f"{p}: directory holds no *.json results files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ZsadError(f"{p}: no such results file or directory")
    return files


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ZsadError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); re-run or remove it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ZsadError(f"{path}: unreadable ({exc}); check the file") from None
    if not isinstance(data, dict) or data.get("schema") not in (RESULTS_SCHEMA, BENCH_SCHEMA):
        schema = data.get("schema") if isinstance(data, dict) else None
        raise ZsadError(
            f"{path}: not a zsad-bench results or benchmark file (schema {schema!r}); pass only files written by "
            "`zsad-bench run` or `zsad-bench bench`"
        )
    return data


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


def scan_results(paths: Sequence[Path | str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(evaluation long frame, benchmark rows) from files and directories of JSON files."""
    eval_rows: list[dict] = []
    bench_rows: list[dict] = []
    for path in _expand(paths):
        data = _read_json(path)
        if data["schema"] == BENCH_SCHEMA:
            bench_rows += _bench_rows(data, str(path))
            continue
        run = RunResult.from_json(data, path)
        suffix = _shot_suffix(run.protocol)
        for r in run.long_rows():
            protocol = r["protocol"] if "@" in r["protocol"] else r["protocol"] + suffix
            eval_rows.append({**r, "protocol": protocol, "source": "measured", "file": str(path)})
    frame = pd.DataFrame(eval_rows, columns=list(LONG_COLUMNS))
    frame["protocol"] = frame["protocol"].map(canonical_protocol)
    frame["value"] = frame["value"].astype(float)
    return frame, pd.DataFrame(bench_rows, columns=[*BENCH_KEYS, *BENCH_VALUES, "overhead", "file"])


def load_results(paths: Sequence[Path | str]) -> pd.DataFrame:
    """Long frame (values as fractions, ``source`` "measured") of the evaluation results in ``paths``.

    ``paths`` are results files or directories (their ``*.json``); benchmark files are skipped here
    (see :func:`load_bench`).
    """
    return scan_results(paths)[0]


def load_bench(paths: Sequence[Path | str]) -> pd.DataFrame:
    """Rows of the ``zsad-bench/bench/v1`` files in ``paths`` (one per method/backbone/dtype/batch/component)."""
    return scan_results(paths)[1]


def load_reported(directory: Path | None = None) -> pd.DataFrame:
    """The papers' reported figures as a long frame (fractions, ``source`` "reported").

    Files named ``*_main_table.csv`` hold main-table figures (category ``mean``); the others per-category
    figures. A ``table`` column says which ("main" or "per_category").
    """
    directory = reported_dir() if directory is None else directory
    frames = []
    for path in sorted(directory.glob("*.csv")):
        df = pd.read_csv(path, dtype={"value": float, "method": str, "protocol": str, "metric": str})
        if "category" not in df:
            df["category"] = MEAN
        missing = {"protocol", "metric", "category", "method", "value"} - set(df.columns)
        if missing:
            raise ZsadError(f"{path}: reported CSV lacks column(s) {', '.join(sorted(missing))}")
        unknown = sorted(set(df["metric"]) - set(METRICS))
        if unknown:
            raise ZsadError(f"{path}: unknown metric(s) {', '.join(unknown)}; use the names in zsad_bench.metrics")
        df = df[["protocol", "metric", "category", "method", "value"]].copy()
        df["value"] = df["value"] / 100.0
        df["protocol"] = df["protocol"].map(canonical_protocol)
        df["backbone"] = ""
        df["seed"] = math.nan
        df["target"] = ""
        df["source"] = "reported"
        df["file"] = str(path)
        df["table"] = "main" if path.stem.endswith("_main_table") else "per_category"
        frames.append(df)
    if not frames:
        raise ZsadError(
            f"{directory}: no reported CSV files; reinstall zsad-bench (its reported figures ship as package data)"
        )
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------------------------- aggregation


def _column_labels(df: pd.DataFrame, columns: str) -> pd.Series:
    """Column label of every row: measured by method or backbone; reported rows get "(reported)"."""
    if columns not in ("method", "backbone"):
        raise ZsadError(f"--columns {columns}: choose method or backbone")
    measured = df["source"] == "measured"
    several_backbones = df.loc[measured, "backbone"].nunique() > 1
    several_methods = df.loc[measured, "method"].nunique() > 1
    labels = []
    for source, method, backbone in zip(df["source"], df["method"], df["backbone"], strict=True):
        if source == "reported":
            labels.append(f"{method}{REPORTED_SUFFIX}")
        elif columns == "method":
            labels.append(f"{method} ({backbone})" if several_backbones else str(method))
        else:
            labels.append(f"{backbone} ({method})" if several_methods else str(backbone))
    return pd.Series(labels, index=df.index, dtype=object)


def _cells(df: pd.DataFrame, columns: str) -> pd.DataFrame:
    """Aggregate to one cell per (protocol, metric, category, column): mean, sample std and number of seeds.

    Measured mean rows are the per-seed means over categories, then aggregated over seeds; reported
    mean rows are the papers' own figures.
    """
    df = df.assign(column=_column_labels(df, columns))
    measured = df[(df["source"] == "measured") & (df["category"].str.lower() != MEAN)]
    keys = ["protocol", "metric", "category", "column", "seed"]
    dup = measured[measured.duplicated(keys, keep=False)]
    if not dup.empty:
        first = dup.iloc[0]
        files = sorted(set(dup.loc[(dup[keys] == first[keys]).all(axis=1), "file"]))
        raise ZsadError(
            f"{' and '.join(files)}: both hold {first['column']} seed {first['seed']} on {first['protocol']}/"
            f"{first['category']}; pass only one of them"
        )
    per_seed_mean = (
        measured.groupby(["protocol", "metric", "column", "seed"])["value"]
        .mean()  # pandas skips NaN categories, as zsad_bench.metrics.category_mean does
        .reset_index()
        .assign(category=MEAN)
    )
    both = pd.concat([measured[[*keys, "value"]], per_seed_mean[[*keys, "value"]]], ignore_index=True)
    agg = both.groupby(["protocol", "metric", "category", "column"])["value"].agg(["mean", "std", "count"])
    agg = agg.reset_index().rename(columns={"count": "n"})
    reported = df[df["source"] == "reported"]
    if "table" in reported:
        reported = reported[reported["table"] != "main"]
    reported = reported.assign(mean=reported["value"], std=math.nan, n=1)
    cols = ["protocol", "metric", "category", "column", "mean", "std", "n"]
    return pd.concat([agg[cols], reported[cols]], ignore_index=True)


def _main_cells(df: pd.DataFrame, columns: str) -> pd.DataFrame:
    """Mean-row cells for the main table; reported main-table figures take precedence over per-category means."""
    cells = _cells(df, columns)
    cells = cells[cells["category"].str.lower() == MEAN]
    reported = df[df["source"] == "reported"]
    if "table" in reported:
        main = reported[reported["table"] == "main"]
        main = main.assign(column=_column_labels(main, columns), mean=main["value"], std=math.nan, n=1)
        cols = ["protocol", "metric", "category", "column", "mean", "std", "n"]
        cells = pd.concat([main[cols], cells], ignore_index=True)
        cells = cells.drop_duplicates(["protocol", "metric", "column"], keep="first")
    return cells


# ----------------------------------------------------------------------------------------------- rendering


def _latex_escape(text: str) -> str:
    repl = {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}",
    }
    return "".join(repl.get(ch, ch) for ch in str(text))


def _fmt_cell(mean: float, std: float, n: int, fmt: str, bold: bool) -> str:
    if mean is None or not math.isfinite(mean):
        return "–" if fmt == "md" else "--"
    text = f"{100 * mean:.1f}"
    if n > 1 and math.isfinite(std):
        pm = " ± " if fmt == "md" else r" $\pm$ "
        text += f"{pm}{100 * std:.1f}"
    if bold:
        return f"**{text}**" if fmt == "md" else rf"\textbf{{{text}}}"
    return text


def _best_mask(values: list[float]) -> list[bool]:
    """Best (highest) value(s) as displayed with one decimal; ties are all best."""
    shown = [round(100 * v, 1) if v is not None and math.isfinite(v) else None for v in values]
    present = [v for v in shown if v is not None]
    if not present:
        return [False] * len(values)
    best = max(present)
    return [v == best for v in shown]


def _grid_text(title: str, header: list[str], body: list[list[str]], fmt: str, rule_before_last: bool) -> str:
    if fmt == "md":
        return f"**{title}**\n\n" + tabulate(body, headers=header, tablefmt="pipe", disable_numparse=True) + "\n"
    lines = [
        r"\begin{table}[ht]",
        r"\centering",
        rf"\caption{{{_latex_escape(title)}}}",
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for i, row in enumerate(body):
        if rule_before_last and i == len(body) - 1 and i > 0:
            lines.append(r"\midrule")
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _category_order(categories: list[str]) -> list[str]:
    return sorted((c for c in set(categories) if c.lower() != MEAN), key=str.lower)


def _per_category_tables(cells: pd.DataFrame, fmt: str) -> list[str]:
    out = []
    for (protocol, metric), sub in cells.groupby(["protocol", "metric"], sort=True):
        cols = _column_order(sub["column"])
        rows = [*_category_order(list(sub["category"])), MEAN]
        lookup = {(_category_key(r.category), r.column): r for r in sub.itertuples()}
        body = []
        for cat in rows:
            found = [lookup.get((cat, c)) for c in cols]
            best = _best_mask([r.mean if r is not None else None for r in found])
            cells_text = [
                _fmt_cell(r.mean, r.std, r.n, fmt, b) if r is not None else _fmt_cell(math.nan, 0, 0, fmt, False)
                for r, b in zip(found, best, strict=True)
            ]
            name = "Mean" if cat == MEAN else cat
            body.append([name if fmt == "md" else _latex_escape(name), *cells_text])
        header = ["Category", *(cols if fmt == "md" else map(_latex_escape, cols))]
        title = f"{protocol} - {metric} (%): {METRICS[metric]}"
        out.append(_grid_text(title, header, body, fmt, rule_before_last=True))
    return out


def _column_order(columns: pd.Series) -> list[str]:
    """Measured columns alphabetically, then reported ones in the papers' order."""
    unique = list(dict.fromkeys(columns))
    return sorted(c for c in unique if not c.endswith(REPORTED_SUFFIX)) + [
        c for c in unique if c.endswith(REPORTED_SUFFIX)
    ]


def _category_key(category: str) -> str:
    return MEAN if category.lower() == MEAN else category


def _main_table(cells: pd.DataFrame, fmt: str) -> str:
    pairs = sorted({(p, m) for p, m in zip(cells["protocol"], cells["metric"], strict=True)})
    methods = _column_order(cells["column"])
    lookup = {(r.protocol, r.metric, r.column): r for r in cells.itertuples()}
    grid = [[lookup.get((p, m, c)) for p, m in pairs] for c in methods]
    best_by_col = [_best_mask([row[j].mean if row[j] is not None else None for row in grid]) for j in range(len(pairs))]
    body = []
    for i, c in enumerate(methods):
        texts = [
            _fmt_cell(r.mean, r.std, r.n, fmt, best_by_col[j][i])
            if r is not None
            else _fmt_cell(math.nan, 0, 0, fmt, False)
            for j, r in enumerate(grid[i])
        ]
        body.append([c if fmt == "md" else _latex_escape(c), *texts])
    header = ["Method", *(f"{p} {m}" for p, m in pairs)]
    if fmt == "latex":
        header = [_latex_escape(h) for h in header]
    title = "Main table: mean over categories (%), " + "; ".join(
        f"{m} = {METRICS[m]}" for m in sorted({m for _, m in pairs})
    )
    return _grid_text(title, header, body, fmt, rule_before_last=False)


def _percent_text(fraction: float) -> str:
    """Percent with up to 4 decimals and at least one, like the papers' CSVs (``99.2``, ``100.0``)."""
    text = f"{100 * fraction:.4f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _long_csv(cells: pd.DataFrame) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    ordered = cells.assign(order=cells["category"].str.lower() == MEAN).sort_values(
        ["protocol", "metric", "order", "category", "column"]
    )
    for r in ordered.itertuples():
        if math.isfinite(r.mean):
            row = [r.protocol, r.metric, _category_key(r.category), r.column, _percent_text(r.mean)]
            writer.writerow(row)
    return buf.getvalue()


def render(
    df: pd.DataFrame,
    fmt: str = "md",
    *,
    metrics: Sequence[str] | None = None,
    columns: str = "method",
    main: bool = True,
) -> str:
    """Per-category tables (one per protocol and metric) and, with ``main``, the main table.

    ``df`` is a long frame from :func:`load_results` (plus :func:`load_reported` rows if wanted).
    ``fmt``: ``md`` (pipe tables), ``latex`` (booktabs) or ``csv`` (long form ``protocol,metric,category,
    method,value`` in percent, category ``mean`` for the mean row; no main table).
    """
    if fmt not in FORMATS:
        raise ZsadError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if metrics:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ZsadError(f"--metric {', '.join(unknown)}: unknown; choose from {', '.join(METRICS)}")
        df = df[df["metric"].isin(list(metrics))]
    if df.empty:
        raise ZsadError("no results to tabulate (check the files and --metric)")
    cells = _cells(df, columns)
    if fmt == "csv":
        return _long_csv(cells)
    parts = _per_category_tables(cells, fmt)
    if main:
        parts.append(_main_table(_main_cells(df, columns), fmt))
    if fmt == "md" and (df["source"] == "reported").any():
        parts.append("Columns marked (reported) are the papers' published figures, not measured here.\n")
    return "\n".join(parts)


SUMMARY_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "aupro", "aupro_cflow")


def render_summary(df: pd.DataFrame, fmt: str = "md", metrics: Sequence[str] = SUMMARY_METRICS) -> str:
    """Compact view of runs: per protocol leg and method, rows = categories + Mean, columns = metrics."""
    cells = _cells(df[df["metric"].isin(list(metrics))], "method")
    out = []
    for (protocol, column), sub in cells.groupby(["protocol", "column"], sort=True):
        present = [m for m in metrics if m in set(sub["metric"])]
        lookup = {(_category_key(r.category), r.metric): r for r in sub.itertuples()}
        body = []
        for cat in [*_category_order(list(sub["category"])), MEAN]:
            found = [lookup.get((cat, m)) for m in present]
            texts = [
                _fmt_cell(r.mean, r.std, r.n, fmt, False) if r else _fmt_cell(math.nan, 0, 0, fmt, False) for r in found
            ]
            body.append(["Mean" if cat == MEAN else cat, *texts])
        out.append(_grid_text(f"{column} on {protocol} (%)", ["Category", *present], body, fmt, rule_before_last=True))
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
        body.append(keys + vals if fmt == "md" else [_latex_escape(x) for x in keys] + vals)
    title = (
        "Speed: images per second, latency percentiles (ms), peak memory (MB) and the method's overhead "
        "(total time / backbone time - 1)"
    )
    if fmt == "latex":
        header = [_latex_escape(h) for h in header]
    return _grid_text(title, header, body, fmt, rule_before_last=False)
