"""Dataset records, adapters (``mvtec:PATH``, ``visa:PATH`` ...), image/mask loading and the one validator."""

from zsad_bench.data.check import check_aux_supervision, validate
from zsad_bench.data.io import DECODING, samples_fingerprint
from zsad_bench.data.records import ANOMALOUS, NORMAL, Dataset, Sample, pixel_labelled
from zsad_bench.data.registry import DATASETS, check_categories, list_datasets, open_dataset, register_dataset

__all__ = [
    "ANOMALOUS",
    "DATASETS",
    "DECODING",
    "NORMAL",
    "Dataset",
    "Sample",
    "check_aux_supervision",
    "check_categories",
    "list_datasets",
    "open_dataset",
    "pixel_labelled",
    "register_dataset",
    "samples_fingerprint",
    "validate",
]
