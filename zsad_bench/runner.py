"""The protocol runner: dataset -> cached features -> fit -> predict -> metrics -> results file.

:func:`run_experiment` executes a :class:`RunSpec` for every seed and protocol leg, writes the
results file atomically after each target category (so ``--resume`` redoes at most the category in
progress), and reuses fitted checkpoints and cached features across runs.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import random
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from zsad_bench import __version__
from zsad_bench.backbones import Backbone, create_backbone
from zsad_bench.data import Dataset, Sample, open_dataset, samples_fingerprint
from zsad_bench.data.io import load_image, load_mask
from zsad_bench.detector import (
    Detector,
    FitContext,
    LearningType,
    check_backbone,
    create_method,
    get_method_class,
    parse_overrides,
)
from zsad_bench.errors import ZsadError
from zsad_bench.features import FeatureCache, extract_features
from zsad_bench.metrics import METRICS, MetricAccumulator
from zsad_bench.paths import cache_dir, project_root
from zsad_bench.protocols import Leg, few_shot_legs, resolve_protocol
from zsad_bench.results import CategoryRecord, RunResult, atomic_write_bytes
from zsad_bench.source import FeatureSource

AUX_SPLITS = ("test", "train")


@dataclass
class RunSpec:
    """Everything that defines a run; see ``zsad-bench run --help`` for the meaning of each field."""

    method: str
    backbone: str | None = None
    protocol: str | None = "synthetic"
    aux: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    data_root: Path | None = None
    aux_categories: list[str] | None = None
    categories: list[str] | None = None
    aux_split: str = "test"
    shots: int | None = None
    seeds: list[int] = field(default_factory=lambda: [111])
    method_config: dict[str, Any] = field(default_factory=dict)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    image_size: int | None = None
    eval_size: int | None = None
    device: str = "auto"
    batch_size: int = 8
    num_workers: int = 0
    out: Path | None = None
    resume: bool = False
    label: str | None = None
    progress: bool = True
    use_cache: bool = True


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ZsadError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_learning_type(cls: type[Detector], legs: list[Leg], shots: int | None) -> None:
    """Refuse a protocol the method's learning type cannot run, with the reason."""
    lt = cls.learning_type
    if lt is LearningType.ZERO_SHOT:
        if shots is not None:
            raise ZsadError(f"method '{cls.name}' is zero-shot (trained on an auxiliary set); drop --shots")
        missing = [leg.name for leg in legs if not leg.aux]
        if missing:
            raise ZsadError(
                f"method '{cls.name}' is zero-shot and needs an auxiliary dataset (--aux DATASET or a named --protocol)"
            )
    elif lt is LearningType.TRAINING_FREE and shots is not None:
        raise ZsadError(f"method '{cls.name}' is training-free and uses no reference images; drop --shots")
    elif lt is LearningType.FEW_SHOT and shots is not None and shots < 1:
        raise ZsadError(f"--shots {shots}: a few-shot method needs at least 1 normal reference image")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "zsad-bench": __version__}
    for pkg in ("torch", "torchvision", "timm", "transformers", "open_clip_torch", "numpy", "scikit-learn", "scipy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def git_commit() -> str:
    try:
        res = subprocess.run(
            ["git", "-C", str(project_root()), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}"


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold ``<results>.lock`` so two runs never write the same results file."""
    lock = path.with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                raise ZsadError(f"{path}: another run (pid {pid}) is writing this results file") from None
            lock.unlink(missing_ok=True)  # stale lock of a killed run
    else:
        raise ZsadError(f"{lock}: cannot take the results lock; delete it if no run is active")
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Log:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[zsad-bench] {msg}", file=sys.stderr, flush=True)


def open_datasets(specs: tuple[str, ...], categories: list[str] | None, split: str, role: str) -> Dataset:
    """Open and concatenate datasets, keep ``categories`` (each must exist in one of them) and ``split``."""
    datasets = [open_dataset(s) for s in specs]
    if categories:
        known = [c for ds in datasets for c in ds.categories]
        missing = [c for c in categories if c not in known]
        if missing:
            raise ZsadError(
                f"{role} categor{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)} not in "
                f"{' + '.join(specs)}; available: {', '.join(known)}"
            )
    samples: list[Sample] = []
    for ds in datasets:
        keep = [c for c in ds.categories if not categories or c in categories]
        samples += ds.select(keep, split).samples
    if not samples:
        raise ZsadError(f"{' + '.join(specs)}: no {split} images for the {role} set")
    first = datasets[0]
    return Dataset("+".join(d.name for d in datasets), first.root, samples, first.kind)


class Runner:
    """Executes one :class:`RunSpec`; use :func:`run_experiment`."""

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.log = _Log(spec.progress)
        self.cls = get_method_class(spec.method)
        if spec.aux_split not in AUX_SPLITS:
            raise ZsadError(f"--aux-split {spec.aux_split}: choose one of {', '.join(AUX_SPLITS)}")
        self.legs = resolve_protocol(spec.protocol, spec.aux, spec.targets, spec.data_root)
        check_learning_type(self.cls, self.legs, spec.shots)
        few_shot = self.cls.learning_type is LearningType.FEW_SHOT
        self.shots = (spec.shots or 1) if few_shot else None
        if few_shot:
            self.legs = few_shot_legs(self.legs)
        self.device = resolve_device(spec.device)
        self.backbone_name = spec.backbone or self.cls.default_backbone
        # cheap checks first: a typo in --set or an unsupported backbone fails before any weights load
        parse_overrides(self.cls, spec.method_config)
        check_backbone(self.cls, self.backbone_name)
        image_size = spec.image_size
        if image_size is None and spec.backbone in (None, self.cls.default_backbone):
            image_size = self.cls.default_image_size  # the paper's size on the paper's backbone
        self.backbone: Backbone = create_backbone(
            self.backbone_name, weights=spec.weights, image_size=image_size, **spec.backbone_kwargs
        ).to(self.device)
        self.detector = create_method(spec.method, self.backbone, self.device, **spec.method_config)
        self.image_size = self.backbone.image_size
        self.eval_size = spec.eval_size or self.image_size
        self.cache = FeatureCache() if spec.use_cache else None
        self.method_config = dataclasses.asdict(self.detector.config)

    # ---------------------------------------------------------------- data sources
    def source(self, samples: list[Sample]) -> FeatureSource:
        """A DataSource over ``samples``: cached features, or preprocessed images for ``needs_images``."""
        pre = self.backbone.preprocess
        if self.cls.needs_images:
            return FeatureSource(samples, self.image_size, None, load_mask, lambda s: pre(load_image(s.image_path)))
        store = extract_features(
            self.backbone,
            samples,
            layers=self.cls.feature_layers,
            cache=self.cache,
            batch_size=max(self.spec.batch_size, 8),
            num_workers=self.spec.num_workers,
            device=self.device,
            progress=self.spec.progress,
        )
        return FeatureSource(samples, self.image_size, store.get, load_mask)

    # ---------------------------------------------------------------- fitting with checkpoints
    def checkpoint_path(self, data_fp: str, seed: int) -> Path:
        fit_config = {k: v for k, v in self.method_config.items() if k not in self.cls.inference_options}
        key = json.dumps(
            [self.cls.name, fit_config, self.backbone.identity, data_fp, seed, self.spec.aux_split],
            sort_keys=True,
            default=str,
        )
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        return cache_dir() / "checkpoints" / self.cls.name / f"{digest}.pt"

    def fit(self, samples: list[Sample], seed: int) -> tuple[Path, float]:
        """Fit on ``samples`` (or load the matching checkpoint); returns (checkpoint, seconds)."""
        data_fp = samples_fingerprint(samples)
        path = self.checkpoint_path(data_fp, seed)
        if path.exists():
            try:
                load_checkpoint(self.detector, path)
                self.log(f"reusing fitted checkpoint {path}")
                return path, 0.0
            except ZsadError as exc:
                self.log(f"ignoring unusable checkpoint ({exc}); refitting")
        seed_everything(seed)
        ctx = FitContext(
            device=self.device,
            seed=seed,
            artifacts_dir=cache_dir() / "artifacts" / (self.cls.artifacts_family or self.cls.name),
            progress=self.spec.progress,
            log=self.log,
        )
        source = self.source(samples)
        t0 = time.perf_counter()
        self.detector.fit(source, ctx)
        seconds = time.perf_counter() - t0
        save_checkpoint(self.detector, path, data_fp, seed)
        return path, seconds

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, samples: list[Sample], desc: str) -> dict[str, float]:
        """Predict ``samples`` and return every metric (fractions; NaN where undefined)."""
        acc = MetricAccumulator(tuple(METRICS), label=desc)
        source = self.source(samples)
        with torch.inference_mode():
            for batch, pred in self.detector.predict_source(source, self.spec.batch_size):
                maps = pred.maps.detach().float()
                if maps.shape[-1] != self.eval_size or maps.shape[-2] != self.eval_size:
                    maps = F.interpolate(
                        maps[:, None], size=(self.eval_size, self.eval_size), mode="bilinear", align_corners=False
                    )[:, 0]
                masks = np.stack([load_mask(s, self.eval_size) for s in batch.samples])
                acc.update(
                    maps.cpu().numpy(),
                    masks,
                    pred.scores.detach().float().cpu().numpy(),
                    np.array([s.label for s in batch.samples]),
                    [str(s.image_path) for s in batch.samples],
                )
        return acc.compute()

    def reference_samples(self, category_samples: Dataset, seed: int) -> list[Sample]:
        """k normal train images of a target category, drawn with ``seed``."""
        normals = [s for s in category_samples.samples if s.split == "train" and s.label == 0]
        k = int(self.shots or 1)
        if len(normals) < k:
            raise ZsadError(
                f"{category_samples.root}: category '{category_samples.categories[0]}' has {len(normals)} normal "
                f"train images, fewer than --shots {k}"
            )
        idx = sorted(np.random.default_rng(seed).choice(len(normals), size=k, replace=False).tolist())
        return [normals[i] for i in idx]

    # ---------------------------------------------------------------- the run
    def new_result(self, run_id: str) -> RunResult:
        spec = self.spec
        cls = self.cls
        protocol = spec.protocol or "+".join(leg.name for leg in self.legs)
        if self.shots is not None:
            protocol = f"{protocol}@{self.shots}-shot"
        return RunResult(
            run_id=run_id,
            method=cls.name,
            method_label=spec.label or cls.display_name or cls.name,
            backbone=self.backbone_name,
            protocol=protocol,
            aux=sorted({a for leg in self.legs for a in leg.aux}),
            targets=sorted({t for leg in self.legs for t in leg.targets}),
            config={"method": self.method_config, "run": self.run_options()},
            seeds=list(spec.seeds),
            learning_type=str(cls.learning_type),
            metric_variants=dict(METRICS),
            versions=package_versions(),
            git_commit=git_commit(),
            device=device_description(self.device),
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )

    def run_options(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "backbone": self.backbone_name,
            "backbone_identity": self.backbone.identity,
            "backbone_kwargs": {k: repr(v) for k, v in spec.backbone_kwargs.items()},
            "weights": spec.weights,
            "image_size": self.image_size,
            "eval_size": self.eval_size,
            "aux_split": spec.aux_split,
            "aux_categories": spec.aux_categories,
            "categories": spec.categories,
            "shots": self.shots,
            "batch_size": spec.batch_size,
            "legs": [dataclasses.asdict(leg) for leg in self.legs],
        }

    def run(self) -> tuple[RunResult, Path]:
        spec = self.spec
        run_id = f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{self.cls.name}-{self.backbone_name}-{secrets.token_hex(3)}"
        out = Path(spec.out) if spec.out else Path("results") / "runs" / f"{run_id}.json"
        if out.suffix != ".json":
            raise ZsadError(f"--out {out}: results files end in .json (a .csv is written beside it)")
        self._check_categories()
        with _exclusive(out):
            result = self._start(out, run_id)
            t_run = time.perf_counter()
            for seed in spec.seeds:
                for leg in self.legs:
                    self._run_leg(result, out, leg, seed)
            result.timings["total_s"] = result.timings.get("total_s", 0.0) + time.perf_counter() - t_run
            result.complete = True
            result.save(out, overwrite=True)
        self.log(f"results: {out} (+ {out.with_suffix('.csv').name})")
        return result, out

    def _check_categories(self) -> None:
        """Every ``--categories`` entry must be a category of some target (legs may have disjoint ones)."""
        if self.spec.categories:
            specs = tuple(sorted({t for leg in self.legs for t in leg.targets}))
            open_datasets(specs, self.spec.categories, "test", "target")

    def _start(self, out: Path, run_id: str) -> RunResult:
        fresh = self.new_result(run_id)
        if not out.exists():
            if self.spec.resume:
                self.log(f"--resume: {out} does not exist yet; starting a new run")
            fresh.save(out)
            return fresh
        if not self.spec.resume:
            raise ZsadError(f"{out}: results file exists; pass --resume to continue it or choose another --out")
        old = RunResult.load(out)
        for attr in ("method", "backbone", "protocol", "config", "seeds"):
            if getattr(old, attr) != getattr(fresh, attr) and not (
                attr == "config" and _same_config(old.config, fresh.config)
            ):
                raise ZsadError(f"{out}: --resume with a different {attr} than the saved run; use another --out")
        done = len(old.records)
        self.log(f"resuming {out}: {done} categor{'y' if done == 1 else 'ies'} already done")
        old.complete = False
        return old

    def _run_leg(self, result: RunResult, out: Path, leg: Leg, seed: int) -> None:
        spec = self.spec
        done = {(r.seed, r.protocol, r.target, r.category) for r in result.records}
        targets = [(t, open_dataset(t)) for t in leg.targets]  # all splits: few-shot references come from train
        todo = [
            (t, ds, c)
            for t, ds in targets
            for c in ds.categories
            if (not spec.categories or c in spec.categories) and (seed, leg.name, t, c) not in done
        ]
        if not todo:
            return
        lt = self.cls.learning_type
        if lt is LearningType.ZERO_SHOT:
            aux = open_datasets(leg.aux, spec.aux_categories, spec.aux_split, "auxiliary")
            self.log(f"[{leg.name} seed {seed}] fitting {self.cls.name} on {len(aux)} auxiliary images ({aux.name})")
            ckpt, fit_s = self.fit(aux.samples, seed)
            result.artifacts[f"checkpoint|{leg.name}|seed={seed}"] = str(ckpt)
            result.timings[f"fit_s|{leg.name}|seed={seed}"] = fit_s
            for k, v in self.detector.summary().items():
                result.summary[f"{k}|{leg.name}|seed={seed}"] = v
        for target, ds, category in self._progress(todo, f"{leg.name} seed {seed}"):
            t0 = time.perf_counter()
            if lt is LearningType.FEW_SHOT:
                self.fit(self.reference_samples(ds.select([category]), seed), seed)
            test = ds.select([category], "test").samples
            if not test:
                raise ZsadError(f"{ds.root}: category '{category}' has no test images")
            metrics = self.evaluate(test, category)
            result.records.append(
                CategoryRecord(seed, target, category, len(test), metrics, time.perf_counter() - t0, leg.name)
            )
            result.save(out, overwrite=True)

    def _progress(self, items: list, desc: str) -> list:
        if not self.spec.progress:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit="category", leave=False)


def _same_config(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def save_checkpoint(detector: Detector, path: Path, data_fingerprint: str, seed: int) -> None:
    """Save ``detector.state_dict()`` with its method, config, backbone identity and training-data hash."""
    import io

    payload = {
        "method": detector.name,
        "config": dataclasses.asdict(detector.config),
        "backbone": detector.backbone.identity,
        "data_fingerprint": data_fingerprint,
        "seed": seed,
        "state": detector.state_dict(),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(detector: Detector, path: Path) -> dict[str, Any]:
    """Load a checkpoint into ``detector`` after checking method and backbone; returns its payload."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ZsadError(f"{path}: checkpoint not found") from None
    except Exception as exc:
        raise ZsadError(f"{path}: unreadable checkpoint ({type(exc).__name__}); delete it to refit") from None
    if payload.get("method") != detector.name:
        raise ZsadError(f"{path}: checkpoint of method '{payload.get('method')}', not '{detector.name}'")
    if payload.get("backbone") != detector.backbone.identity:
        raise ZsadError(
            f"{path}: checkpoint was fitted on backbone '{payload.get('backbone')}', "
            f"not '{detector.backbone.identity}'; run with the same --backbone/--image-size/--weights"
        )
    detector.load_state_dict(payload["state"])
    return payload


def run_experiment(spec: RunSpec) -> tuple[RunResult, Path]:
    """Run ``spec`` end to end; returns the result and the path of its JSON file."""
    return Runner(spec).run()


def rebuild(
    result_path: Path,
    seed: int | None = None,
    leg_index: int = 0,
    backbone_kwargs: dict[str, Any] | None = None,
    device: str = "cpu",
) -> tuple[Detector, FeatureSource]:
    """The fitted detector of a finished zero-shot run (from its checkpoint) and its auxiliary DataSource."""
    result = RunResult.load(Path(result_path))
    run = result.config.get("run", {})
    legs = [Leg(d["name"], tuple(d["aux"]), tuple(d["targets"])) for d in run.get("legs", [])]
    if not legs or leg_index >= len(legs):
        raise ZsadError(f"{result_path}: run has no protocol leg #{leg_index}")
    leg = legs[leg_index]
    seed = result.seeds[0] if seed is None else seed
    key = f"checkpoint|{leg.name}|seed={seed}"
    if key not in result.artifacts:
        raise ZsadError(f"{result_path}: no fitted checkpoint for leg '{leg.name}' seed {seed} (not a zero-shot run?)")
    spec = RunSpec(
        method=result.method,
        backbone=result.backbone,
        protocol=None,
        aux=list(leg.aux),
        targets=list(leg.targets),
        aux_categories=run.get("aux_categories"),
        aux_split=run.get("aux_split", "test"),
        method_config=result.config.get("method", {}),
        backbone_kwargs=backbone_kwargs or {},
        weights=run.get("weights"),
        image_size=run.get("image_size"),
        device=device,
        progress=False,
    )
    runner = Runner(spec)
    load_checkpoint(runner.detector, Path(result.artifacts[key]))
    aux = open_datasets(leg.aux, spec.aux_categories, spec.aux_split, "auxiliary")
    return runner.detector, runner.source(aux.samples)
