"""Result tables from saved results files: per-category tables (like the SPG appendix, Tables S1-S8),
a main table (target sets x metrics, like its Table 1) and speed tables, as Markdown, LaTeX or CSV.

:mod:`~zsad_bench.tables.load` reads results (schema v1/v2), benchmark files and the papers' reported
CSVs into long frames (:mod:`~zsad_bench.tables.names` names datasets and legs as a person would);
:mod:`~zsad_bench.tables.aggregate` places rows in tables and columns and averages them;
:mod:`~zsad_bench.tables.bootstrap` gives confidence intervals and a paired test from per-image records;
:mod:`~zsad_bench.tables.model` ties those together for the renderers; :mod:`~zsad_bench.tables.text`
formats cells and grids and :mod:`~zsad_bench.tables.render` writes the Markdown, LaTeX and CSV tables.
Reported figures are added only on request and always carry "(reported)".
"""

from zsad_bench.tables.aggregate import REPORTED_SUFFIX
from zsad_bench.tables.load import (
    MEAN,
    Scan,
    load_bench,
    load_reported,
    load_results,
    reported_dir,
    scan,
    scan_results,
)
from zsad_bench.tables.names import canonical_protocol, leg_setting
from zsad_bench.tables.render import CSV_COLUMNS, FORMATS, render, render_bench, render_summary

__all__ = [
    "CSV_COLUMNS",
    "FORMATS",
    "MEAN",
    "REPORTED_SUFFIX",
    "Scan",
    "canonical_protocol",
    "leg_setting",
    "load_bench",
    "load_reported",
    "load_results",
    "render",
    "render_bench",
    "render_summary",
    "reported_dir",
    "scan",
    "scan_results",
]
