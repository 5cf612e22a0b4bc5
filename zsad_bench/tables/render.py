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
from dataclasses import dataclass
from typing import Any

import pandas as pd
from tabulate import tabulate

from zsad_bench.errors import ZsadError
from zsad_bench.metrics import METRICS, PIXEL_METRICS
from zsad_bench.tables import bootstrap
from zsad_bench.tables.aggregate import INCOMPLETE_MARK, REPORTED_SUFFIX, cells, column_info, evaluated, main_cells
from zsad_bench.tables.aggregate import prepare as place
from zsad_bench.tables.load import BENCH_VALUES, MEAN, _bench_rows

FORMATS = ("md", "latex", "csv")
CSV_COLUMNS = ("protocol", "metric", "category", "method", "value")
PARTIAL_MARK = "‡"
NO_MASKS = "n/a (no masks)"
SUMMARY_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "aupro", "aupro_cflow")

_MD_SPECIAL = {"\\": "\\\\", "|": "\\|", "*": "\\*", "`": "\\`", "<": "\\<", "[": "\\[", "]": "\\]"}
_LATEX_SPECIAL = {
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
    "|": r"\textbar{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "\n": " ",
    "\r": " ",
    INCOMPLETE_MARK: r"$^\dagger$",
    PARTIAL_MARK: r"$^\ddagger$",
}


def md_escape(text: str) -> str:
    """A Markdown table cell that shows ``text`` as written: pipes, emphasis, code, HTML and link marks escaped."""
    return "".join(_MD_SPECIAL.get(ch, " " if ch in "\r\n" else ch) for ch in str(text))


def latex_escape(text: str) -> str:
    """LaTeX text for ``text`` (specials escaped, ``->`` as an arrow, daggers as superscripts)."""
    parts = str(text).split("->")
    return r"$\rightarrow$".join("".join(_LATEX_SPECIAL.get(ch, ch) for ch in p) for p in parts)


def _escape(text: str, fmt: str) -> str:
    return md_escape(text) if fmt == "md" else latex_escape(text)


@dataclass
class CellText:
    """What a cell shows, beyond its number."""

    ci: tuple[float, float] | None = None
    no_masks: bool = False
    partial: bool = False


def _fmt_cell(mean: float, std: float, n: int, fmt: str, bold: bool, extra: CellText | None = None) -> str:
    extra = extra or CellText()
    if extra.no_masks:
        return NO_MASKS
    if mean is None or not math.isfinite(mean):
        return "–" if fmt == "md" else "--"
    text = f"{100 * mean:.1f}"
    if n > 1 and math.isfinite(std):
        pm = " ± " if fmt == "md" else r" $\pm$ "
        text += f"{pm}{100 * std:.1f}"
    if extra.ci is not None:
        text += f" [{100 * extra.ci[0]:.1f}, {100 * extra.ci[1]:.1f}]"
    if bold:
        text = f"**{text}**" if fmt == "md" else rf"\textbf{{{text}}}"
    if extra.partial:
        text += PARTIAL_MARK if fmt == "md" else r"$^\ddagger$"
    return text


def _best_mask(values: list[float | None], eligible: list[bool]) -> list[bool]:
    """Best (highest) value(s) as displayed with one decimal among the eligible columns; ties are all best."""
    shown = [
        round(100 * v, 1) if ok and v is not None and math.isfinite(v) else None
        for v, ok in zip(values, eligible, strict=True)
    ]
    present = [v for v in shown if v is not None]
    if not present:
        return [False] * len(values)
    return [v == max(present) for v in shown]


def _grid_text(
    title: str, header: list[str], body: list[list[str]], fmt: str, rules: Sequence[int], notes: list[str]
) -> str:
    """One table; ``rules``: body row indexes with a rule above them (LaTeX); ``notes`` go under it."""
    if fmt == "md":
        text = f"**{title}**\n\n" + tabulate(body, headers=header, tablefmt="pipe", disable_numparse=True) + "\n"
        return text + ("\n" + "\n".join(f"{n}  " for n in notes).rstrip() + "\n" if notes else "")
    lines = [
        r"\begin{table}[ht]",
        r"\centering",
        rf"\caption{{{title}}}",
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for i, row in enumerate(body):
        if i in rules and i > 0:
            lines.append(r"\midrule")
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if notes:
        lines.append(r"\par\smallskip{\footnotesize " + r" \\ ".join(notes) + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- table model


@dataclass
class Model:
    """Placed rows, their cells and per-column facts, shared by the renderers."""

    rows: pd.DataFrame
    cells: pd.DataFrame
    info: pd.DataFrame
    done: set[tuple[str, str, str]]
    titles: dict[str, str]
    hidden_controls: int
    ci: dict[tuple, tuple[float, float]]
    ci_requested: bool = False
    maskless: frozenset[str] = frozenset()

    def col(self, key: str, column: str) -> Mapping[str, Any]:
        sub = self.info[(self.info["table_key"] == key) & (self.info["column"] == column)]
        return sub.iloc[0].to_dict()

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
    model = Model(rows, cells(rows, done), column_info(rows), done, titles, hidden, {}, maskless=maskless)
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


# ----------------------------------------------------------------------------------------------- tables


def _lookup(cells_: pd.DataFrame) -> dict[tuple, Any]:
    return {(r.category, r.is_mean, r.column): r for r in cells_.itertuples()}


def _cell(
    model: Model, key: str, metric: str, cat: str, is_mean: bool, column: str, r: Any, fmt: str, bold: bool
) -> str:
    if r is None:
        return _fmt_cell(math.nan, 0, 0, fmt, False)
    info = model.col(key, column)
    partial = bool(
        is_mean
        and info["source"] == "measured"
        and not r.no_masks
        and metric in PIXEL_METRICS
        and 0 < r.n_categories < model.n_evaluated(key, column)
    )
    extra = CellText(model.ci.get((key, metric, cat, is_mean, column)), bool(r.no_masks), partial)
    return _fmt_cell(r.mean, r.std, r.n, fmt, bold, extra)


def _notes(model: Model, key: str, metric: str, cols: Sequence[str], body: list[list[str]], fmt: str) -> list[str]:
    """Footnotes: each column's setting and backbone, and every mark that appears in the table."""
    esc = md_escape if fmt == "md" else latex_escape
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
                "and its means cover those only; finish it with `zsad-bench run ... --resume`."
            )
        )
    if NO_MASKS in text:
        notes.append(esc(f"{NO_MASKS}: the category has no ground-truth masks, so its pixel metrics are absent "
                         "(not averaged into the mean)."))  # fmt: skip
    if PARTIAL_MARK in text or r"\ddagger" in text:
        notes.append(esc(f"{PARTIAL_MARK} mean over the categories with masks only."))
    if key in model.maskless:
        notes.append(esc("No pixel metrics: none of these targets has ground-truth masks (image labels only)."))
    if model.ci_requested and metric in bootstrap.CI_METRICS:
        with_ci = [c for c in cols if any(k[0] == key and k[4] == c for k in model.ci)]
        without = [c for c in cols if c not in with_ci]
        note = "[low, high]: bootstrap confidence interval (images resampled within each category and label)."
        if without:
            note += f" No interval for {', '.join(without)}: no per-image records (results schema v1 or reported)."
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
    return md_escape(text) if fmt == "md" else latex_escape(text)


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
            best = _best_mask([r.mean if r is not None and not r.no_masks else None for r in found], eligible)
            texts = [
                _cell(model, key, metric, cat, is_mean, c, r, fmt, b) for c, r, b in zip(cols, found, best, strict=True)
            ]
            name = ("Mean over categories" if collide else "Mean") if is_mean else _escape(cat, fmt)
            body.append([name, *texts])
        header = ["Category", *(_escape(c, fmt) for c in cols)]
        title = _escape(f"{model.titles[key]} - {metric} (%): {METRICS[metric]}", fmt)
        notes = _notes(model, key, metric, cols, body, fmt)
        margin = _margin_note(model, key, metric, cols, look, fmt)
        out.append(_grid_text(title, header, body, fmt, [len(body) - 1], notes + ([margin] if margin else [])))
    return out


def _main_table(model: Model, cells_: pd.DataFrame, fmt: str) -> str:
    pairs = sorted({(k, m) for k, m in zip(cells_["table_key"], cells_["metric"], strict=True)},
                   key=lambda km: (model.titles[km[0]], km[1]))  # fmt: skip
    control = {
        c for k, c in zip(model.info["table_key"], model.info["column"], strict=True) if model.col(k, c)["control"]
    }
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
        _best_mask([row[j].mean if row[j] is not None and not row[j].no_masks else None for row in grid], eligible)
        for j in range(len(pairs))
    ]
    body = []
    for i, c in enumerate(methods):
        texts = [_cell(model, k, m, "", True, c, grid[i][j], fmt, best_by_col[j][i]) for j, (k, m) in enumerate(pairs)]
        body.append([_escape(c, fmt), *texts])
    header = ["Method", *(_escape(f"{model.titles[k]} {m}", fmt) for k, m in pairs)]
    title = "Main table: mean over categories (%), " + "; ".join(
        f"{m} = {METRICS[m]}" for m in sorted({m for _, m in pairs})
    )
    rules = [methods.index(c) for c in methods if c in control][:1]
    notes = []
    if any(INCOMPLETE_MARK in c for c in methods):
        notes.append(_escape(f"{INCOMPLETE_MARK} interrupted run: means over the categories it finished.", fmt))
    if any(NO_MASKS in t for row in body for t in row):
        notes.append(_escape(f"{NO_MASKS}: the targets have no ground-truth masks.", fmt))
    if any(PARTIAL_MARK in t or r"\ddagger" in t for row in body for t in row):
        notes.append(_escape(f"{PARTIAL_MARK} mean over the categories with masks only.", fmt))
    if control & set(methods):
        notes.append(_escape("Rows after the methods are controls (floors, never marked best).", fmt))
    return _grid_text(_escape(title, fmt), header, body, fmt, rules, notes)


def _percent_text(fraction: float) -> str:
    """Percent with up to 4 decimals and at least one, like the papers' CSVs (``99.2``, ``100.0``)."""
    text = f"{100 * fraction:.4f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


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
            row = [r.title, r.metric, MEAN if r.is_mean else r.category, r.column, _percent_text(r.mean)]
            if model.ci_requested:
                ci = model.ci.get((r.table_key, r.metric, r.category, r.is_mean, r.column))
                row += [_percent_text(ci[0]), _percent_text(ci[1])] if ci else ["", ""]
            writer.writerow(row)
    return buf.getvalue()


def _paired_text(model: Model, results: list, level: float, n_boot: int, seed: int, fmt: str) -> str:
    header = ["Targets", "A", "B", "A - B (points)", f"{level:g}% interval", "p", "images", "categories"]
    body = [
        [
            _escape(model.titles[key], fmt),
            _escape(r.a, fmt),
            _escape(r.b, fmt),
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
    return _grid_text(_escape(title, fmt), [_escape(h, fmt) for h in header], body, fmt, [], [])


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
            name = ("Mean over categories" if collide else "Mean") if is_mean else _escape(cat, fmt)
            body.append([name, *texts])
        title = _escape(f"{column} on {model.titles[key]} (%)", fmt)
        out.append(_grid_text(title, ["Category", *present], body, fmt, [len(body) - 1], []))
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
        body.append([_escape(x, fmt) for x in keys] + vals)
    title = (
        "Speed: images per second, latency percentiles (ms), peak memory (MB) and the method's overhead "
        "(total time / backbone time - 1)"
    )
    return _grid_text(_escape(title, fmt), [_escape(h, fmt) for h in header], body, fmt, [], [])
