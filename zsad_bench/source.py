"""DataSource implementations: batches of samples with features, masks and (optionally) images."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from zsad_bench.backbones.base import Features
from zsad_bench.data.records import Sample
from zsad_bench.detector import Batch
from zsad_bench.errors import ZsadError
from zsad_bench.features import FeatureStore, collate_images, raise_batch_error

FeatureGetter = Callable[[Sequence[int]], Features]
MaskGetter = Callable[[Sample, int], np.ndarray]
ImageGetter = Callable[[Sample], torch.Tensor]


class _ImageItems(torch.utils.data.Dataset):
    """``(index, image, error)`` through an :data:`ImageGetter`; errors travel back as one-line messages."""

    def __init__(self, samples: Sequence[Sample], images: ImageGetter) -> None:
        self.samples, self.images = samples, images

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.images(self.samples[i]), ""
        except ZsadError as exc:
            return i, None, str(exc)


class FeatureSource:
    """Samples whose backbone features are fetched by index (from the cache or from memory).

    ``masks(sample, size)`` returns a boolean ``(size, size)`` mask; ``images(sample)`` returns the
    preprocessed image tensor (only needed for detectors with ``needs_images``), decoded by
    ``num_workers`` DataLoader processes when > 0. When ``features`` is a :class:`FeatureStore`'s ``get``,
    :attr:`feature_info` says its precision, stored dtype and key parts, and ``batches(native=True)``
    returns the features in their stored dtype.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        features: FeatureGetter | None,
        masks: MaskGetter | None = None,
        images: ImageGetter | None = None,
        num_workers: int = 0,
    ) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self._features = features
        self._masks = masks
        self._images = images
        self.num_workers = num_workers
        owner = getattr(features, "__self__", None)
        self._store = owner if isinstance(owner, FeatureStore) else None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def feature_info(self) -> dict[str, Any]:
        """``precision``, ``dtype`` (stored) and ``key_parts`` of the features ({} when not from a store)."""
        if self._store is None:
            return {}
        return {"precision": self._store.precision, "dtype": self._store.dtype, "key_parts": self._store.key_parts}

    def batches(
        self, batch_size: int, shuffle: bool = False, seed: int = 0, masks: bool = False, native: bool = False
    ) -> Iterator[Batch]:
        order = np.arange(len(self.samples))
        if shuffle:
            order = np.random.default_rng(seed).permutation(order)
        chunks = [order[start : start + batch_size].tolist() for start in range(0, len(order), batch_size)]
        images = self._image_batches(chunks) if self._images is not None else None
        for idx in chunks:
            samples = [self.samples[i] for i in idx]
            yield Batch(
                samples=samples,
                features=self._get_features(idx, native) if self._features is not None else None,
                images=next(images) if images is not None else None,
                masks=self._load_masks(samples) if masks else None,
            )

    def _get_features(self, idx: list[int], native: bool) -> Features:
        if native and self._store is not None:
            return self._store.get(idx, native=True)
        assert self._features is not None
        return self._features(idx)

    def _image_batches(self, chunks: list[list[int]]) -> Iterator[torch.Tensor]:
        assert self._images is not None
        if self.num_workers <= 0:
            for idx in chunks:
                yield torch.stack([self._images(self.samples[i]) for i in idx])
            return
        loader = torch.utils.data.DataLoader(
            _ImageItems(self.samples, self._images),
            batch_sampler=chunks,
            num_workers=self.num_workers,
            collate_fn=collate_images,
        )
        for _, images, error in loader:
            raise_batch_error(error)
            yield images

    def _load_masks(self, samples: list[Sample]) -> torch.Tensor:
        if self._masks is None:
            raise ValueError("this source has no mask loader")
        return torch.from_numpy(np.stack([self._masks(s, self.image_size) for s in samples])).float()


def tensor_features(
    patches: torch.Tensor, global_token: torch.Tensor | None = None, layer: str = "last"
) -> FeatureGetter:
    """A getter over in-memory features ``(N, h, w, C)`` (tests and hand-made features)."""

    def get(indices: Sequence[int]) -> Features:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return Features({layer: patches[idx]}, None if global_token is None else global_token[idx])

    return get
