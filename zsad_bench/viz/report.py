"""``zsad-bench report``: one self-contained HTML file (figures embedded as ``data:`` URIs, no external
resource, no script) with the main table, per-category tables, the figures of :mod:`zsad_bench.viz.plots`
(plus overlay grids where maps were saved) and each run's provenance. Opens offline in any browser.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from zsad_bench import __version__
from zsad_bench.results import atomic_write_text
from zsad_bench.viz import plots
from zsad_bench.viz.maps import has_maps
from zsad_bench.viz.runs import Run, load_runs, pick_seeds, seed_note

TABLE_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro", "aupro_cflow", "pixel_f1_max")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1150px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:2px solid #555;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.5em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#eef4fa}td:first-child,th:first-child{text-align:left}tr.mean td{font-weight:600;
border-top:2px solid #888}b{color:#0b4f8a}figure{margin:1.2em 0;border:1px solid #ddd;padding:.5em;
background:#fff}figure img{max-width:100%;height:auto}figcaption{font-size:.9em;color:#444}
pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:.8em}details{margin:.5em 0}nav li{margin:.1em 0}
.note{color:#666;font-size:.9em}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}" if math.isfinite(v) else "&ndash;"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], mean_last: bool = False, cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        attr = ' class="mean"' if mean_last and i == len(rows) - 1 else ""
        body.append(f"<tr{attr}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _bold_best(values: list[float]) -> list[str]:
    finite = [v for v in values if math.isfinite(v)]
    best = max(finite) if finite else math.nan
    return [f"<b>{_pct(v)}</b>" if len(finite) > 1 and v == best else _pct(v) for v in values]


def _legs(runs: Sequence[Run]) -> list[str]:
    return list(dict.fromkeys(rec["protocol"] for r in runs for rec in r.records))


def _metrics(runs: Sequence[Run]) -> list[str]:
    present = {m for r in runs for rec in r.records for m in rec["metrics"]}
    return [m for m in TABLE_METRICS if m in present]


def main_table(runs: Sequence[Run]) -> str:
    """Per protocol leg: rows = runs, columns = metrics (mean over categories of the seed means), best in bold."""
    out = []
    metrics = _metrics(runs)
    for leg in _legs(runs):
        on_leg = [r for r in runs if any(rec["protocol"] == leg for rec in r.records)]
        cols = []
        for m in metrics:
            vals = []
            for r in on_leg:
                cats = list(dict.fromkeys(rec["category"] for rec in r.records if rec["protocol"] == leg))
                per = [r.metric(c, m, leg) for c in cats]
                per = [v for v in per if math.isfinite(v)]
                vals.append(sum(per) / len(per) if per else math.nan)
            cols.append(_bold_best(vals))
        rows = [[_e(r.label), *[col[i] for col in cols]] for i, r in enumerate(on_leg)]
        out.append(f"<h3>{_e(leg)}</h3>" + _table(["Method", *map(_e, metrics)], rows))
    return "\n".join(out)


def category_tables(runs: Sequence[Run]) -> str:
    """Per leg and metric: rows = categories (+ Mean), columns = runs, values in %, best of each row in bold."""
    out = []
    for leg in _legs(runs):
        on_leg = [r for r in runs if any(rec["protocol"] == leg for rec in r.records)]
        cats = list(dict.fromkeys(rec["category"] for r in on_leg for rec in r.records if rec["protocol"] == leg))
        for m in _metrics(on_leg):
            rows = []
            for c in cats:
                rows.append([_e(c), *_bold_best([r.metric(c, m, leg) for r in on_leg])])
            means = []
            for r in on_leg:
                per = [r.metric(c, m, leg) for c in cats]
                per = [v for v in per if math.isfinite(v)]
                means.append(sum(per) / len(per) if per else math.nan)
            rows.append(["Mean", *_bold_best(means)])
            header = ["Category", *[_e(r.label) for r in on_leg]]
            out.append(f"<h3>{_e(m)} on {_e(leg)} (%)</h3>" + _table(header, rows, mean_last=True, cls="per-category"))
    return "\n".join(out)


def provenance(run: Run) -> str:
    """Config, versions, commit, device and timings of one run."""
    d = run.data
    facts = [
        ("file", run.path),
        ("method", f"{d.get('method')} ({d.get('learning_type', '')})"),
        ("backbone", d.get("backbone")),
        ("protocol", d.get("protocol")),
        ("seeds", ", ".join(map(str, d.get("seeds", [])))),
        ("created", d.get("created")),
        ("git commit", d.get("git_commit") or "unknown"),
        ("device", d.get("device")),
        ("complete", d.get("complete")),
        ("schema", d.get("schema")),
        ("per-image records", len(run.images)),
        ("saved maps", "yes" if has_maps(run.path) else "no"),
    ]
    rows = [[_e(k), _e(v)] for k, v in facts]
    versions = [[_e(k), _e(v)] for k, v in (d.get("versions") or {}).items()]
    timings = [[_e(k), f"{float(v):.2f}"] for k, v in (d.get("timings") or {}).items() if v is not None]
    config = json.dumps(d.get("config") or {}, indent=2, default=str)
    return (
        f"<h3>{_e(run.label)}</h3>"
        + _table(["", ""], rows)
        + "<details><summary>versions</summary>"
        + _table(["package", "version"], versions)
        + "</details><details><summary>timings (s)</summary>"
        + _table(["step", "seconds"], timings)
        + f"</details><details><summary>config</summary><pre>{_e(config)}</pre></details>"
    )


def _overlay_grids(runs: Sequence[Run], n: int, seed: int | None = None) -> list[tuple[str, str, str, bytes]]:
    """Worst-``n`` overlay grids of every category, from runs with saved maps (nothing is re-predicted here), of
    ``seed`` (default: each run's first)."""
    import tempfile

    from zsad_bench.viz.show import show_grid

    saved = [r for r in runs if has_maps(r.path)]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for cat in plots._categories(saved):
            group = [r for r in saved if cat in r.categories()]
            try:
                png, _ = show_grid(group, cat, Path(tmp) / "grid.png", n=n, mode="worst", seed=seed)
            except Exception as exc:  # one undrawable category must not lose the report
                print(f"[zsad-bench] report: no overlay grid for {cat} ({exc})")
                continue
            title = f"Overlays, {cat} (worst {n})"
            note = seed_note(group, pick_seeds(group, seed))
            cap = "Input | ground truth | map | overlay with the F1-optimal threshold contour (cyan), per run" + (
                f"; {note}." if note else "."
            )
            out.append((f"overlay_{plots._safe(cat)}", title, cap, png.read_bytes()))
    return out


def build_report(
    paths: Sequence[Path | str],
    out: Path,
    overlays: int = 4,
    log: Callable[[str], None] | None = None,
    seed: plots.Seed = None,
) -> tuple[Path, list[str]]:
    """Write the HTML report of the results files/directories ``paths`` to ``out``; returns (file, figure names).

    ``seed`` as in :func:`zsad_bench.viz.plots.all_figures`; the overlays show that seed (the first with "all").
    """
    runs = load_runs(list(paths))
    one = None if seed == plots.ALL_SEEDS else seed
    figs = plots.all_figures(runs, seed)
    items = [(f.name, f.title, f.caption, plots.png_bytes(f)) for f in figs]
    plots.close(figs)
    if overlays:
        items += _overlay_grids(runs, overlays, one)
    nav = "".join(f'<li><a href="#fig-{_e(name)}">{_e(title)}</a></li>' for name, title, _, _ in items)
    figures = "\n".join(
        f'<figure id="fig-{_e(name)}" data-name="{_e(name)}"><img alt="{_e(title)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}"><figcaption><b>{_e(title)}.</b> '
        f"{_e(cap)}</figcaption></figure>"
        for name, title, cap, png in items
    )
    missing = [r.label for r in runs if not r.images]
    note = (
        f'<p class="note">No per-image records in: {_e(", ".join(missing))} (results schema v1); their curves and '
        "histograms are not drawn.</p>"
        if missing
        else ""
    )
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>zsad-bench report</title><style>{CSS}</style></head><body>
<h1>zsad-bench report</h1>
<p>{len(runs)} run(s): {_e(", ".join(r.label for r in runs))}. Generated {now} by zsad-bench {_e(__version__)}.
Values are percentages; bold is the best of its row or column.</p>{note}
<nav><h2>Contents</h2><ol><li><a href="#main">Main table</a></li><li><a href="#per-category">Per-category tables</a>
</li><li><a href="#figures">Figures</a><ol class="figure-index">{nav}</ol></li><li><a href="#provenance">Provenance</a>
</li></ol></nav>
<h2 id="main">Main table (mean over categories, %)</h2>
{main_table(runs)}
<h2 id="per-category">Per-category tables</h2>
{category_tables(runs)}
<h2 id="figures">Figures</h2>
{figures or '<p class="note">No figures: the results files hold no per-image records or saved maps.</p>'}
<h2 id="provenance">Provenance</h2>
{"".join(provenance(r) for r in runs)}
</body></html>
"""
    out = Path(out)
    atomic_write_text(out, doc)
    if log:
        log(f"report: {out} ({len(doc) / 1e6:.1f} MB, {len(items)} figures, {len(runs)} runs)")
    return out, [name for name, *_ in items]
