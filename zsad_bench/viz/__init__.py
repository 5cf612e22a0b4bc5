"""Figures and reports from results files: saved anomaly maps, qualitative grids, curves, an HTML report.

* :mod:`zsad_bench.viz.maps`: ``--save-maps`` storage (fp16, compressed ``.npz`` beside the results file).
* :mod:`zsad_bench.viz.runs`: tolerant reading of results files (v1 and v2, per-image records).
* :mod:`zsad_bench.viz.show`: the qualitative grid (input | ground truth | map | overlay with F1 contour).
* :mod:`zsad_bench.viz.plots`: ROC/PR/PRO curves, bar charts, histograms, few-shot and ablation plots.
* :mod:`zsad_bench.viz.report`: one self-contained HTML report.

What needs saved maps: pixel ROC and PRO curves always; overlays of few-shot, training-free and
transductive runs (only zero-shot runs can be rebuilt from their fitted checkpoint).
"""

NEEDS_MAPS = (
    "Saved maps (zsad-bench run --save-maps) are needed for pixel ROC and PRO curves, and for `show` overlays of "
    "few-shot, training-free and transductive runs; zero-shot runs without them are re-predicted from their "
    "fitted checkpoint and the feature cache."
)
