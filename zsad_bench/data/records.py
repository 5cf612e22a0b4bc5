"""The one record type every dataset adapter produces, and a dataset as a list of them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

NORMAL = 0
ANOMALOUS = 1


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    ``label`` is 0 (normal) or 1 (anomalous); ``mask_path`` is None for normal images (an all-zero
    mask is implied) and required for anomalous test images. ``defect_type`` is ``"good"`` for
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


def samples_fingerprint(samples: Sequence[Sample]) -> str:
    """SHA-1 of the ordered sample records (paths, labels, masks, sizes and mtimes of images)."""
    h = hashlib.sha1()
    for s in samples:
        st = s.image_path.stat() if s.image_path.exists() else None
        stamp = f"{st.st_size}:{st.st_mtime_ns}" if st else "missing"
        h.update(f"{s.image_path}|{s.label}|{s.mask_path}|{s.category}|{s.split}|{stamp}\n".encode())
    return h.hexdigest()
