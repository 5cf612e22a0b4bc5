"""Dataset records, adapters (``mvtec:PATH``, ``visa:PATH`` ...) and image/mask loading."""

from zsad_bench.data.records import ANOMALOUS, NORMAL, Dataset, Sample, samples_fingerprint
from zsad_bench.data.registry import DATASETS, list_datasets, open_dataset, register_dataset

__all__ = [
    "ANOMALOUS",
    "DATASETS",
    "NORMAL",
    "Dataset",
    "Sample",
    "list_datasets",
    "open_dataset",
    "register_dataset",
    "samples_fingerprint",
]
