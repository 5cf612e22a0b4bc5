"""zsad-bench: a benchmark harness for zero-shot anomaly detection and segmentation."""

from zsad_bench.errors import DataError, ZsadError

__version__ = "0.1.0"
__all__ = ["DataError", "ZsadError", "__version__"]
