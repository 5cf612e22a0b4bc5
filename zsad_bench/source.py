"""DataSource implementations: batches of samples with features, masks and (optionally) images."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from zsad_bench.backbones.base import Features
from zsad_bench.data.records import Sample
from zsad_bench.detector import Batch

FeatureGetter = Callable[[Sequence[int]], Features]
MaskGetter = Callable[[Sample, int], np.ndarray]
ImageGetter = Callable[[Sample], torch.Tensor]


class FeatureSource:
    """Samples whose backbone features are fetched by index (from the cache or from memory).

    ``masks(sample, size)`` returns a boolean ``(size, size)`` mask; ``images(sample)`` returns the
    preprocessed image tensor (only needed for detectors with ``needs_images``).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        features: FeatureGetter | None,
        masks: MaskGetter | None = None,
        images: ImageGetter | None = None,
    ) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self._features = features
        self._masks = masks
        self._images = images

    def __len__(self) -> int:
        return len(self.samples)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, masks: bool = False) -> Iterator[Batch]:
        order = np.arange(len(self.samples))
        if shuffle:
            order = np.random.default_rng(seed).permutation(order)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size].tolist()
            samples = [self.samples[i] for i in idx]
            yield Batch(
                samples=samples,
                features=self._features(idx) if self._features is not None else None,
                images=torch.stack([self._images(s) for s in samples]) if self._images is not None else None,
                masks=self._load_masks(samples) if masks else None,
            )

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
