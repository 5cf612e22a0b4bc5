"""One process's working set for a run: the resolved spec, one backbone, one detector, their data sources.

:func:`build_detector` is the one place a detector is built from a :class:`RunSpec` (``run``, the
plan executor, ``bench``, ``rebuild`` and SPG's ``atoms`` all use it). :class:`Session` adds what
executing work items needs on top: feature sources, fitting with checkpoints, evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from zsad_bench import locks, presets
from zsad_bench.backbones import Backbone, create_backbone
from zsad_bench.data import Dataset, Sample, pixel_labelled, samples_fingerprint
from zsad_bench.data.io import load_image, load_mask
from zsad_bench.detector import (
    Detector,
    FitContext,
    LearningType,
    check_backbone,
    create_method,
    get_method_class,
    inference_options,
    parse_overrides,
    plugin_call,
)
from zsad_bench.errors import ZsadError
from zsad_bench.features import (
    FeatureCache,
    check_precision,
    default_num_workers,
    extract_features,
    feature_key_parts,
    set_deterministic,
)
from zsad_bench.metrics import METRICS, MetricAccumulator
from zsad_bench.paths import cache_dir
from zsad_bench.presets import ResolvedSettings
from zsad_bench.protocols import Leg, few_shot_legs, resolve_protocol, target_kind
from zsad_bench.results import ImageRecord
from zsad_bench.runner.checkpoints import SUFFIX, load_checkpoint, save_checkpoint
from zsad_bench.runner.spec import AUX_SPLITS, RunSpec, check_learning_type, resolve_device, seed_everything
from zsad_bench.source import FeatureSource
from zsad_bench.viz.maps import MapWriter
from zsad_bench.viz.maps import check_size as check_map_size


class Log:
    """``[zsad-bench] message`` lines on stderr unless the run is quiet."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[zsad-bench] {msg}", file=sys.stderr, flush=True)


@dataclass
class Resolved:
    """A spec checked and resolved without loading weights: method class, legs, shots, preset settings.

    ``settings`` are the run-wide preset settings (backbone, size, layers, options) for the targets' common
    dataset kind; ``leg_options`` the method options of each leg, which differ where the legs' targets are
    of different kinds (per-dataset defaults such as MuSc's RsCIN windows).
    """

    cls: type[Detector]
    legs: list[Leg]
    shots: int | None
    settings: ResolvedSettings
    leg_options: dict[str, dict[str, Any]]

    @property
    def backbone_name(self) -> str:
        return self.settings.backbone

    @property
    def image_size(self) -> int | None:
        return self.settings.image_size


def resolve(spec: RunSpec) -> Resolved:
    """Check ``spec`` cheaply (method, options, protocol, learning type, backbone) and resolve its preset."""
    cls = get_method_class(spec.method)
    if spec.aux_split not in AUX_SPLITS:
        raise ZsadError(f"--aux-split {spec.aux_split}: choose one of {', '.join(AUX_SPLITS)}")
    legs = resolve_protocol(spec.protocol, spec.aux, spec.targets, spec.data_root)
    check_learning_type(cls, legs, spec.shots)
    few_shot = cls.learning_type is LearningType.FEW_SHOT
    shots = (spec.shots or 1) if few_shot else None
    if few_shot:
        legs = few_shot_legs(legs)

    def settings_for(targets: Sequence[str]) -> ResolvedSettings:
        return presets.resolve(
            cls, spec.preset, target_kind(None, targets), spec.backbone, spec.method_config, spec.image_size
        )

    settings = settings_for([t for leg in legs for t in leg.targets])
    leg_options = {leg.name: settings_for(leg.targets).config_overrides for leg in legs}
    # cheap checks first: a typo in --set or an unsupported backbone fails before any weights load
    for options in leg_options.values():
        parse_overrides(cls, options)
    check_backbone(cls, settings.backbone)
    return Resolved(cls, legs, shots, settings, leg_options)


def build_detector(spec: RunSpec, resolved: Resolved | None = None) -> Detector:
    """The backbone (built once, on the spec's device) and the method's detector on it, at the spec's preset."""
    r = resolved or resolve(spec)
    device = resolve_device(spec.device)
    backbone: Backbone = create_backbone(
        r.backbone_name, weights=spec.weights, image_size=r.image_size, **spec.backbone_kwargs
    ).to(device)
    return create_method(spec.method, backbone, device, **r.settings.config_overrides)


class Session:
    """A built detector plus the operations work items need: data sources, fit (with checkpoints), evaluate."""

    def __init__(self, spec: RunSpec, log: Callable[[str], None] | None = None) -> None:
        self.spec = spec
        self.log = log or Log(spec.progress)
        check_precision(spec.precision)
        set_deterministic(spec.deterministic)
        if spec.save_maps is not None:
            check_map_size(spec.save_maps)
        self.map_writer: MapWriter | None = None  # set by the executor for --save-maps
        self.resolved = resolve(spec)
        self.cls = self.resolved.cls
        self.detector = build_detector(spec, self.resolved)
        self.device = self.detector.device
        self.backbone = self.detector.backbone
        self.image_size = self.backbone.image_size
        self.eval_size = spec.eval_size or self.image_size
        self.cache = FeatureCache() if spec.use_cache else None
        self.method_config = dataclasses.asdict(self.detector.config)
        self.layers = self.resolved.settings.layers or self.cls.feature_layers
        self._options = self.resolved.settings.config_overrides

    def use_leg(self, leg: str) -> bool:
        """Configure the detector for ``leg``'s targets (per-dataset defaults); True when it was rebuilt.

        A rebuilt detector has lost any fitted state, so the caller fits (or loads) it again.
        """
        options = self.resolved.leg_options[leg]
        if options == self._options:
            return False
        self.detector = create_method(self.spec.method, self.backbone, self.device, **options)
        self.method_config = dataclasses.asdict(self.detector.config)
        self._options = options
        return True

    # ---------------------------------------------------------------- data sources
    def source(self, samples: list[Sample]) -> FeatureSource:
        """A DataSource over ``samples``: cached features, or preprocessed images for ``needs_images``."""
        pre = self.backbone.preprocess
        if self.cls.needs_images:
            workers = self.spec.num_workers
            if workers is None:
                workers = default_num_workers(len(samples), self.spec.batch_size)
            return FeatureSource(samples, self.image_size, None, load_mask, _Preprocessed(pre), num_workers=workers)
        store = extract_features(
            self.backbone,
            samples,
            layers=self.layers,
            cache=self.cache,
            batch_size=max(self.spec.batch_size, 8),
            num_workers=self.spec.num_workers,
            device=self.device,
            progress=self.spec.progress,
            precision=self.spec.precision,
        )
        return FeatureSource(samples, self.image_size, store.get, load_mask)

    # ---------------------------------------------------------------- fitting with checkpoints
    def checkpoint_path(self, data_fp: str, seed: int) -> Path:
        """Checkpoint of a fit: keyed by method, fit-relevant config, backbone, training data, seed, aux split."""
        skip = inference_options(self.cls)
        fit_config = {k: v for k, v in self.method_config.items() if k not in skip}
        features = feature_key_parts(self.backbone, self.spec.precision, self.device)
        key = json.dumps(
            [self.cls.name, fit_config, self.backbone.identity, features, data_fp, seed, self.spec.aux_split],
            sort_keys=True,
            default=str,
        )
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        return cache_dir() / "checkpoints" / self.cls.name / f"{digest}{SUFFIX}"

    def artifacts_dir(self) -> Path:
        """Where the method keeps sub-fits shared across configurations (SPG's SAE), per artifacts family."""
        return cache_dir() / "artifacts" / (self.cls.artifacts_family or self.cls.name)

    def fit(self, samples: list[Sample], seed: int) -> tuple[Path, float]:
        """Fit on ``samples`` or load the matching checkpoint; returns (checkpoint, seconds spent fitting).

        The checkpoint's lock is held while fitting, so parallel workers of one plan fit it once.
        """
        data_fp = samples_fingerprint(samples)
        path = self.checkpoint_path(data_fp, seed)
        with locks.waiting(path, timeout=None):
            if self._try_load(path):
                return path, 0.0
            seed_everything(seed)
            ctx = FitContext(
                device=self.device,
                seed=seed,
                artifacts_dir=self.artifacts_dir(),
                progress=self.spec.progress,
                log=self.log,
            )
            source = self.source(samples)
            t0 = time.perf_counter()
            # one writer of the family's shared sub-fits (the plan's "shared" node) at a time
            with locks.waiting(ctx.artifacts_dir / "shared", timeout=None):
                plugin_call(self.detector, "fit", self.detector.fit, source, ctx)
            seconds = time.perf_counter() - t0
            save_checkpoint(self.detector, path, data_fp, seed)
        return path, seconds

    def _try_load(self, path: Path) -> bool:
        old = path.with_suffix(".pt")
        if old.exists() and not path.exists():
            self.log(f"not loading {old}: pickled checkpoint of an older zsad-bench (unsafe); refitting")
        if not path.exists():
            return False
        try:
            load_checkpoint(self.detector, path)
        except ZsadError as exc:
            self.log(f"ignoring unusable checkpoint ({exc}); refitting")
            return False
        self.log(f"reusing fitted checkpoint {path}")
        return True

    # ---------------------------------------------------------------- evaluation
    def evaluate(
        self, samples: list[Sample], desc: str, maps_key: tuple[int, str, str] | None = None
    ) -> tuple[dict[str, float], list[tuple[Sample, float]]]:
        """Predict ``samples``: every metric (fractions; NaN where undefined) and each image's score.

        With a map writer and ``maps_key`` (seed, leg, category) the maps are saved too (``--save-maps``).
        """
        writer = self.map_writer if maps_key is not None else None
        labelled = pixel_labelled(samples)  # False: image labels only, pixel metrics left out (not NaN)
        acc = MetricAccumulator(tuple(METRICS), label=desc, pixel_labels=labelled)
        source = self.source(samples)
        scored: list[tuple[Sample, float]] = []
        with torch.inference_mode():
            predictions = plugin_call(
                self.detector, "predict", self.detector.predict_source, source, self.spec.batch_size
            )
            for batch, pred in predictions:
                maps = pred.maps.detach().float()
                if maps.shape[-1] != self.eval_size or maps.shape[-2] != self.eval_size:
                    maps = F.interpolate(
                        maps[:, None], size=(self.eval_size, self.eval_size), mode="bilinear", align_corners=False
                    )[:, 0]
                masks = np.stack([load_mask(s, self.eval_size) for s in batch.samples]) if labelled else None
                if writer is not None:
                    writer.add(*maps_key, [str(s.image_path) for s in batch.samples], maps, masks)
                scores = pred.scores.detach().float().cpu().numpy()
                acc.update(
                    maps.cpu().numpy(),
                    masks,
                    scores,
                    np.array([s.label for s in batch.samples]),
                    [str(s.image_path) for s in batch.samples],
                )
                scored += list(zip(batch.samples, scores.tolist(), strict=True))
        if writer is not None:
            writer.close_category(*maps_key)
        return acc.compute(), scored

    def reference_samples(self, category: Dataset, seed: int) -> list[Sample]:
        """k normal train images of a target category, drawn with ``seed``."""
        normals = [s for s in category.samples if s.split == "train" and s.label == 0]
        k = int(self.resolved.shots or 1)
        if len(normals) < k:
            raise ZsadError(
                f"{category.root}: category '{category.categories[0]}' has {len(normals)} normal "
                f"train images, fewer than --shots {k}"
            )
        idx = sorted(np.random.default_rng(seed).choice(len(normals), size=k, replace=False).tolist())
        return [normals[i] for i in idx]


class _Preprocessed:
    """Image getter for ``needs_images`` methods: load + the backbone's preprocessing (picklable for workers)."""

    def __init__(self, preprocess: Callable[[Any], torch.Tensor]) -> None:
        self.preprocess = preprocess

    def __call__(self, sample: Sample) -> torch.Tensor:
        return self.preprocess(load_image(sample.image_path))


def image_records(seed: int, leg: str, target: str, scored: list[tuple[Sample, float]]) -> list[ImageRecord]:
    """One :class:`ImageRecord` per evaluated image."""
    return [
        ImageRecord(seed, leg, target, s.category, str(s.image_path), s.defect_type, int(s.label), float(score))
        for s, score in scored
    ]


def summary_of(detector: Detector) -> dict[str, Any]:
    """The detector's extra numbers for the fit record."""
    return dict(plugin_call(detector, "summary", detector.summary))
