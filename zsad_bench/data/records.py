"""The one record type every dataset adapter produces, and a dataset as a list of them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from zsad_bench.errors import DataError

NORMAL = 0
ANOMALOUS = 1


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    ``label`` is 0 (normal) or 1 (anomalous); ``mask_path`` is None for normal images (an all-zero
    mask is implied) and for the anomalous images of an image-label-only category (one without any
    mask; see :func:`pixel_labelled`). ``defect_type`` is ``"good"`` for
    normal images. ``split`` is ``"train"`` or ``"test"`` as in the dataset's own layout.
    """

    image_path: Path
    category: str
    label: int
    mask_path: Path | None
    defect_type: str
    split: str

    @property
    def key(self) -> str:
        """Stable identifier, unique within a dataset: ``category/split/defect/stem``."""
        return f"{self.category}/{self.split}/{self.defect_type}/{self.image_path.stem}"


@dataclass
class Dataset:
    """An ordered collection of samples from one root, produced by a dataset adapter."""

    name: str
    root: Path
    samples: list[Sample]
    kind: str = "folder"
    meta: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    @property
    def categories(self) -> list[str]:
        """Categories in first-appearance order."""
        return list(dict.fromkeys(s.category for s in self.samples))

    def select(self, categories: Iterable[str] | None = None, split: str | None = None) -> Dataset:
        """A new dataset restricted to ``categories`` (in the given order) and/or ``split``."""
        samples = self.samples
        if split is not None:
            samples = [s for s in samples if s.split == split]
        if categories is not None:
            order = list(categories)
            samples = [s for c in order for s in samples if s.category == c]
        return replace(self, samples=samples)


def pixel_labelled(samples: Sequence[Sample]) -> bool:
    """Whether the anomalous images among ``samples`` (one category) have pixel masks.

    True when every anomalous image has a mask (or there is none), False when none has one (an
    image-label-only category: pixel metrics are not computed). Some with and some without is a
    :class:`DataError` naming the first image without a mask.
    """
    anomalous = [s for s in samples if s.label == ANOMALOUS]
    without = [s for s in anomalous if s.mask_path is None]
    if without and len(without) < len(anomalous):
        first = without[0]
        raise DataError(
            f"{first.image_path}: anomalous image has no mask, but {len(anomalous) - len(without)} other anomalous "
            f"images of category '{first.category}' have one; add its mask or drop the image "
            "(a category has masks for all its anomalous images or for none)"
        )
    return not without
