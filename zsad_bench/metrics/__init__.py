"""Exact, streaming anomaly-detection metrics (image/pixel AUROC, AP, F1-max and two AUPRO variants).

``aupro`` is the MVTec AD definition (all thresholds, FPR integrated to 0.3 and divided by 0.3);
``aupro_cflow`` is the 200-threshold, min-max-rescaled variant most ZSAD papers (and the SPG release)
report. The two differ by several points; tables and results files always name which one they show.
"""

from zsad_bench.metrics.accumulator import (
    IMAGE_METRICS,
    METRICS,
    PIXEL_METRICS,
    MetricAccumulator,
    UndefinedMetricWarning,
    category_mean,
)
from zsad_bench.metrics.functional import (
    aupro,
    aupro_cflow,
    f1_max,
    image_ap,
    image_auroc,
    pixel_ap,
    pixel_auroc,
)

__all__ = [
    "IMAGE_METRICS",
    "METRICS",
    "PIXEL_METRICS",
    "MetricAccumulator",
    "UndefinedMetricWarning",
    "aupro",
    "aupro_cflow",
    "category_mean",
    "f1_max",
    "image_ap",
    "image_auroc",
    "pixel_ap",
    "pixel_auroc",
]
