"""From long frames to table cells: which table and column each row belongs to, means over seeds and categories.

Tables are keyed by the target set (plus the shots of few-shot runs): runs of different learning types on
the same targets (a training-free run, a zero-shot run trained on VisA) land side by side, each column
carrying its setting (``VisA -> MVTec AD``, ``training-free``, ``1-shot``) and backbone. The mean over
categories is its own row kind (``is_mean``), never a category that happens to be called "mean".
"""

from __future__ import annotations

import math
import re

import pandas as pd

from zsad_bench.errors import ZsadError
from zsad_bench.metrics import PIXEL_METRICS
from zsad_bench.tables.names import reported_kind

REPORTED_SUFFIX = " (reported)"
INCOMPLETE_MARK = "†"
CELL_KEYS = ["table_key", "metric", "category", "is_mean", "column"]
CELL_COLUMNS = [*CELL_KEYS, "mean", "std", "n", "n_categories", "no_masks"]


def _file_reported(df: pd.DataFrame) -> pd.DataFrame:
    """Reported rows join the measured tables on the same kind of targets (and shots); alone, they keep their own."""
    measured = df[df["source"] == "measured"]
    reported = df[df["source"] == "reported"]
    if measured.empty or reported.empty:
        return df
    by_kind: dict[str, list[str]] = {}
    for key in dict.fromkeys(measured["table_key"]):
        by_kind.setdefault(reported_kind(key), []).append(key)
    joined = [
        reported[reported["table_key"] == kind].assign(table_key=key) for kind, keys in by_kind.items() for key in keys
    ]
    return pd.concat([measured, *joined], ignore_index=True)


LITERATURE_NAME = re.compile(r"^(mvtec|visa)(-to-(mvtec|visa))?(@\d+-shot)?$")


def _titles(df: pd.DataFrame) -> dict[str, str]:
    """Table title per key. When its measured columns (else its reported ones) share one leg: the literature's
    name for it (``visa-to-mvtec``, ``mvtec@1-shot``, as the papers' CSVs spell it), else the leg as a person
    writes it (``VisA -> MVTec AD (bottle)``). Otherwise the target set (``MVTec AD``). A title two target sets
    would share names their targets."""
    titles, names = {}, {}
    for key, sub in df.groupby("table_key", sort=False):
        measured = sub[sub["source"] == "measured"]
        ruling = measured if not measured.empty else sub
        names[key] = str(sub["target_name"].iloc[0])
        protocols = set(ruling["protocol"])
        protocol = protocols.pop() if len(protocols) == 1 else None
        setting = str(ruling["setting"].iloc[0])
        if protocol is not None and LITERATURE_NAME.match(protocol):
            titles[key] = protocol
        elif protocol is not None and " -> " in setting:
            titles[key] = setting
        else:
            titles[key] = names[key]
    for extra in (names, {k: k for k in titles}):  # the target names, else the dataset specs themselves
        shared = {t for t in titles.values() if list(titles.values()).count(t) > 1}
        titles = {k: f"{t} on {extra[k]}" if t in shared else t for k, t in titles.items()}
    return titles


def _labels(df: pd.DataFrame, columns: str) -> pd.Series:
    """Column label of every row, unique per (source, method, backbone, setting) within a table.

    Measured columns are named by method (``columns="method"``) or backbone, the other added in brackets when
    the files hold several; reported ones get "(reported)"; a label shared by two settings in one table gets
    the setting in brackets; an interrupted run gets a dagger.
    """
    if columns not in ("method", "backbone"):
        raise ZsadError(f"--columns {columns}: choose method or backbone")
    measured = df["source"] == "measured"
    several_backbones = df.loc[measured, "backbone"].nunique() > 1
    several_methods = df.loc[measured, "method"].nunique() > 1
    base = []
    for source, method, backbone in zip(df["source"], df["method"], df["backbone"], strict=True):
        if source == "reported":
            base.append(f"{method}{REPORTED_SUFFIX}")
        elif columns == "method":
            base.append(f"{method} ({backbone})" if several_backbones else str(method))
        else:
            base.append(f"{backbone} ({method})" if several_methods else str(backbone))
    frame = df.assign(base=base)
    ident = ["table_key", "source", "method", "backbone", "setting"]
    settings = frame.groupby(["table_key", "base"])["setting"].transform("nunique")
    label = frame["base"].where(settings <= 1, frame["base"] + " [" + frame["setting"] + "]")
    incomplete = ~frame.groupby(ident)["complete"].transform("all")
    return label.where(~incomplete, label + INCOMPLETE_MARK)


def prepare(df: pd.DataFrame, columns: str = "method", controls: bool = False) -> pd.DataFrame:
    """Rows placed in their tables: adds ``column`` (label) and ``title``; drops controls unless ``controls``."""
    if not controls:
        df = df[~df["control"]]
    df = _file_reported(df)
    df = df.assign(column=_labels(df, columns))
    titles = _titles(df)
    return df.assign(title=df["table_key"].map(titles))


def column_info(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (table, column): source, control, complete, backbone, setting, learning type, files, seeds."""
    rows = []
    for (key, column), sub in df.groupby(["table_key", "column"], sort=False):
        rows.append(
            {
                "table_key": key,
                "column": column,
                "source": sub["source"].iloc[0],
                "control": bool(sub["control"].any()),
                "complete": bool(sub["complete"].all()),
                "backbone": str(sub["backbone"].iloc[0]),
                "setting": str(sub["setting"].iloc[0]),
                "learning_type": str(sub["learning_type"].iloc[0]),
                "files": sorted(set(sub["file"])),
                "seeds": sorted({int(s) for s in sub["seed"] if isinstance(s, int | float) and math.isfinite(s)}),
            }
        )
    return pd.DataFrame(rows)


def evaluated(df: pd.DataFrame) -> set[tuple[str, str, str]]:
    """(table, column, category) of every measured category with any metric: a pixel metric missing from one of
    these was omitted because the category has no masks (the accumulator leaves the key out)."""
    measured = df[df["source"] == "measured"]
    return set(zip(measured["table_key"], measured["column"], measured["category"], strict=True))


def _check_duplicates(measured: pd.DataFrame) -> None:
    keys = ["table_key", "protocol", "metric", "category", "column", "seed"]
    dup = measured[measured.duplicated(keys, keep=False)]
    if not dup.empty:
        first = dup.iloc[0]
        files = sorted(set(dup.loc[(dup[keys] == first[keys]).all(axis=1), "file"]))
        raise ZsadError(
            f"{' and '.join(files)}: both hold {first['column']} seed {first['seed']} on {first['protocol']}/"
            f"{first['category']}; pass only one of them"
        )


def cells(df: pd.DataFrame, done: set[tuple[str, str, str]] | None = None) -> pd.DataFrame:
    """One cell per (table, metric, category or mean row, column): mean, sample std and number of seeds.

    Measured mean rows are the per-seed means over the categories with a value (NaN and absent pixel metrics
    skipped, as :func:`zsad_bench.metrics.category_mean` does), then aggregated over seeds; ``n_categories``
    says how many categories each mean covers. Reported mean rows are the papers' own figures. ``done`` (from
    :func:`evaluated`) marks pixel cells of mask-less categories (``no_masks``).
    """
    done = evaluated(df) if done is None else done
    measured = df[df["source"] == "measured"]
    _check_duplicates(measured)
    keys = ["table_key", "metric", "category", "column", "seed"]
    per_seed_mean = (
        measured.groupby(["table_key", "metric", "column", "seed"])["value"]
        .agg(value="mean", n_categories="count")
        .reset_index()
        .assign(category="", is_mean=True)
    )
    per_cat = measured[[*keys, "value"]].assign(is_mean=False, n_categories=1)
    both = pd.concat([per_cat, per_seed_mean[[*keys, "value", "is_mean", "n_categories"]]], ignore_index=True)
    agg = both.groupby(CELL_KEYS).agg(
        mean=("value", "mean"), std=("value", "std"), n=("value", "count"), n_categories=("n_categories", "max")
    )
    agg = agg.reset_index()
    reported = df[(df["source"] == "reported") & (df["table"] != "main")]
    reported = reported.assign(mean=reported["value"], std=math.nan, n=1, n_categories=0)
    reported = reported.assign(category=reported["category"].where(~reported["is_mean"], ""))
    out = pd.concat([agg, reported[[*CELL_KEYS, "mean", "std", "n", "n_categories"]]], ignore_index=True)
    out["no_masks"] = False
    out = pd.concat([out, _no_mask_cells(measured, done)], ignore_index=True)[CELL_COLUMNS]
    return out.astype({"is_mean": bool, "no_masks": bool, "n": int, "n_categories": int})


def _no_mask_cells(measured: pd.DataFrame, done: set[tuple[str, str, str]]) -> pd.DataFrame:
    """Cells for pixel metrics that an evaluated category lacks (no masks), and n/a mean rows where none has one."""
    rows = []
    for (key, metric, column), sub in measured.groupby(["table_key", "metric", "column"]):
        if metric not in PIXEL_METRICS:
            continue
        have = set(sub["category"])
        for t, c, category in done:
            if t == key and c == column and category not in have:
                rows.append((key, metric, category, False, column))
    present = {(k, m) for k, m in zip(measured["table_key"], measured["metric"], strict=True) if m in PIXEL_METRICS}
    columns_done = {(t, c) for t, c, _ in done}
    with_pixels = set(zip(measured["table_key"], measured["metric"], measured["column"], strict=True))
    for key, metric in present:
        for t, column in columns_done:
            if t == key and (key, metric, column) not in with_pixels:
                rows += [(key, metric, cat, False, column) for tt, cc, cat in done if tt == t and cc == column]
                rows.append((key, metric, "", True, column))
    frame = pd.DataFrame(rows, columns=CELL_KEYS)
    return frame.assign(mean=math.nan, std=math.nan, n=0, n_categories=0, no_masks=True)


def main_cells(df: pd.DataFrame, done: set[tuple[str, str, str]] | None = None) -> pd.DataFrame:
    """Mean-row cells for the main table; reported main-table figures take precedence over per-category means."""
    out = cells(df, done)
    out = out[out["is_mean"]]
    main = df[(df["source"] == "reported") & (df["table"] == "main")]
    if not main.empty:
        main = main.assign(mean=main["value"], std=math.nan, n=1, n_categories=0, no_masks=False, category="")
        out = pd.concat([main[CELL_COLUMNS], out], ignore_index=True)
        out = out.drop_duplicates(["table_key", "metric", "column"], keep="first")
    return out
