"""Sweep plans: a grid file (or a preset such as ``ablate``) expanded into points, their ids and shared stages.

A *point* is one ordinary run (one results file). Its id is a hash of its resolved configuration
(the method's full Config with defaults, the resolved backbone, data and seeds; not where or how it
runs), so editing a grid never renames, hence never reruns, a point that did not change.

*Stages* are the work several points share, planned as dependencies and run first:

* ``fill``: feature extraction of one (backbone, image size, layers) over the images of one dataset,
  split into shards of ``fill_shard`` images (the feature cache is per image, so shards are independent);
* ``fit``: the first point of each shared-fit group (SPG's SAE: same backbone, auxiliary data, SAE
  settings and seed) runs before the other points of the group, which then reuse its artifact.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zsad_bench.cli.run import run_actions
from zsad_bench.errors import ZsadError
from zsad_bench.sweep.config import check_options, convert_option, key_line, read_toml

# Config fields of a shared sub-fit, by ``artifacts_family``: mirrors the key of SPG's SAE artifact
# (``SPG._sae_key`` in zsad_bench/methods/spg.py); points that agree on these share one SAE fit.
SHARED_FITS: dict[str, tuple[str, ...]] = {
    "spg": (
        "sae_width",
        "sae_k",
        "sae_epochs",
        "sae_batch_size",
        "sae_lr",
        "sae_betas",
        "auxk",
        "auxk_coef",
        "dead_window_tokens",
        "dead_fire_threshold",
        "input_norm",
    ),
}
SWEEP_KEYS = {"out_dir": str, "threads": int, "gpus_per_point": float, "fill_shard": int}
SECTIONS = ("sweep", "base", "grid", "exclude")
DEFAULT_FILL_SHARD = 2000


@dataclass
class Variant:
    """One point before resolution: run options (argparse dests) and an optional label / file name."""

    options: dict[str, Any]
    label: str | None = None
    name: str | None = None
    axes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Point:
    """A resolved point: its id, label, results file name and run options."""

    id: str
    label: str
    name: str
    options: dict[str, Any]
    axes: dict[str, Any]
    resolved: dict[str, Any]

    @property
    def results_name(self) -> str:
        return f"{self.name}.json"


@dataclass
class Stage:
    """Shared work: a feature-cache shard (``fill``) or the leader point of a shared-fit group (``fit``)."""

    id: str
    kind: str
    payload: dict[str, Any]


@dataclass
class Plan:
    """Points in grid order, stages, and each point's dependencies (stage ids)."""

    points: list[Point]
    fills: list[Stage]
    leaders: dict[str, str]  # point id -> id of its group's leader point (leaders map to themselves)
    deps: dict[str, list[str]]  # point id -> fill stage ids


@dataclass
class Grid:
    """A parsed grid file."""

    path: Path | None
    variants: list[Variant]
    out_dir: Path | None = None
    threads: int | None = None
    gpus_per_point: float | None = None
    fill_shard: int = DEFAULT_FILL_SHARD
    text: str = ""


def _digest(obj: Any, n: int = 12) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


# ---------------------------------------------------------------------------------------------- grid files
def _axis_values(key: str, values: Any, path: Path, text: str, actions: dict) -> list[Any]:
    """The values of axis ``key`` ("method", "set.sae_k", ...), each validated as a single option value."""
    where = f"{path}:{key_line(text, 'grid', key)}: grid.{key}"
    if not isinstance(values, list) or not values:
        raise ZsadError(f"{where}: an axis is a non-empty list of values, e.g. {key} = [a, b]")
    if key.startswith("set."):
        for v in values:
            if isinstance(v, dict):
                raise ZsadError(f"{where}: expected plain values, got a table")
        return values
    dest = key.replace("-", "_")
    if dest == "backbone":
        return [_backbone_entry(v, where) for v in values]
    if dest in ("out", "resume", "config") or dest not in actions:
        raise ZsadError(f"{where}: not a run option to sweep; options: {', '.join(sorted(actions))}, set.OPTION")
    return [convert_option(dest, v, actions[dest], where) for v in values]


def _backbone_entry(value: Any, where: str) -> tuple[str, int | None]:
    """``"NAME"`` or ``"NAME:SIZE"`` -> (name, size)."""
    if not isinstance(value, str) or not value:
        raise ZsadError(f"{where}: expected a backbone name (NAME or NAME:SIZE), got {value!r}")
    name, _, size = value.partition(":")
    if size and not size.isdigit():
        raise ZsadError(f"{where}: {value!r}: expected NAME or NAME:SIZE, e.g. dinov3:448")
    return name, int(size) if size else None


def _flatten_axes(table: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key == "set" and isinstance(value, dict):
            out.update({f"set.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _apply(options: dict[str, Any], key: str, value: Any) -> None:
    """Set axis ``key`` to ``value`` in a copy-on-write options dict."""
    if key.startswith("set."):
        from zsad_bench.sweep.config import _set_text

        sets = [s for s in options.get("set") or [] if s.partition("=")[0] != key[4:]]
        options["set"] = [*sets, f"{key[4:]}={_set_text(value)}"]
    elif key == "backbone":
        options["backbone"], size = value
        if size is not None:
            options["image_size"] = size
    else:
        options[key.replace("-", "_")] = value


def _axis_label(key: str, value: Any) -> str:
    if key == "backbone":
        return value[0] + (f"@{value[1]}" if value[1] else "")
    if key == "method":
        return str(value)
    shown = ",".join(map(str, value)) if isinstance(value, list) else value
    return f"{key.removeprefix('set.')}={shown}"


def load_grid(path: Path) -> Grid:
    """Parse and validate a grid file (sections ``[sweep]``, ``[base]``, ``[grid]``, ``[[exclude]]``)."""
    path = Path(path)
    doc, text = read_toml(path)
    for key in doc:
        if key not in SECTIONS or (key != "exclude" and not isinstance(doc[key], dict)):
            raise ZsadError(f"{path}:{key_line(text, key)}: unknown section [{key}]; sections: {', '.join(SECTIONS)}")
    settings: dict[str, Any] = {}
    for key, value in doc.get("sweep", {}).items():
        where = f"{path}:{key_line(text, 'sweep', key)}: sweep.{key}"
        if key not in SWEEP_KEYS:
            raise ZsadError(f"{where}: unknown key; keys: {', '.join(SWEEP_KEYS)}")
        kind = SWEEP_KEYS[key]
        ok = isinstance(value, str) if kind is str else isinstance(value, int | float) and not isinstance(value, bool)
        if kind is int and ok:
            ok = isinstance(value, int) and value >= 1
        if kind is float and ok:
            ok = value > 0 and (value <= 1 or float(value).is_integer())
        if not ok:
            want = {str: "a string", int: "an integer >= 1", float: "a GPU fraction in (0, 1] or a whole number"}[kind]
            raise ZsadError(f"{where}: expected {want}, got {value!r}")
        settings[key] = value
    actions = run_actions()
    base = check_options(doc.get("base", {}), actions, path, text, "base")
    axes = {k: _axis_values(k, v, path, text, actions) for k, v in _flatten_axes(doc.get("grid", {})).items()}
    excludes = doc.get("exclude", [])
    if not isinstance(excludes, list):
        raise ZsadError(f"{path}:{key_line(text, 'exclude')}: write exclusions as [[exclude]] tables")
    rules = []
    for i, rule in enumerate(excludes):
        flat = _flatten_axes(rule)
        for key, value in flat.items():
            if key not in axes:
                raise ZsadError(
                    f"{path}:{key_line(text, 'exclude', key, i)}: exclude.{key}: not a [grid] axis; axes: "
                    f"{', '.join(axes) or 'none'}"
                )
            values = value if isinstance(value, list) and not key.startswith("seed") else [value]
            flat[key] = [_axis_values(key, [v], path, text, actions)[0] for v in values]
        rules.append(flat)
    variants = []
    for combo in itertools.product(*axes.values()) if axes else [()]:
        chosen = dict(zip(axes, combo, strict=True))
        if any(all(chosen[k] in vs for k, vs in rule.items()) for rule in rules):
            continue
        options = {k: (list(v) if isinstance(v, list) else v) for k, v in base.items()}
        for key, value in chosen.items():
            _apply(options, key, value)
        label = " ".join(_axis_label(k, v) for k, v in chosen.items() if len(axes[k]) > 1 and k != "seed")
        variants.append(Variant(options, label or None, None, {k: _axis_label(k, v) for k, v in chosen.items()}))
    if not variants:
        raise ZsadError(f"{path}: the exclusions remove every point of the grid; loosen [[exclude]]")
    return Grid(
        path,
        variants,
        Path(settings["out_dir"]) if "out_dir" in settings else None,
        settings.get("threads"),
        settings.get("gpus_per_point"),
        settings.get("fill_shard", DEFAULT_FILL_SHARD),
        text,
    )


# ---------------------------------------------------------------------------------------------- resolution
def spec_from_options(options: dict[str, Any]) -> Any:
    """A RunSpec from run options (argparse dests), exactly as ``zsad-bench run`` builds it."""
    from zsad_bench.cli.run import spec_from_args

    actions = run_actions()
    return spec_from_args(argparse.Namespace(**({dest: a.default for dest, a in actions.items()} | options)))


def resolve(variant: Variant, where: Any) -> tuple[Any, dict[str, Any]]:
    """(RunSpec, resolved config) of a variant; ``where(key)`` names the file and line of a key in errors."""
    from zsad_bench.detector import get_method_class, parse_overrides

    if not variant.options.get("method"):
        raise ZsadError(f"{where('method')}: a point has no method; set method in [base] or as a [grid] axis")
    spec = spec_from_options(variant.options)
    try:
        cls = get_method_class(spec.method)
    except ZsadError as exc:
        raise ZsadError(f"{where('method')}: {exc}") from None
    for key, value in spec.method_config.items():  # one option at a time, to name its line
        try:
            parse_overrides(cls, {key: value})
        except ZsadError as exc:
            raise ZsadError(f"{where('set.' + key)}: {exc}") from None
    try:
        config = dataclasses.asdict(parse_overrides(cls, spec.method_config))
    except ZsadError as exc:
        raise ZsadError(f"{where('set')}: {exc}") from None
    from zsad_bench import presets
    from zsad_bench.backbones import BACKBONES
    from zsad_bench.protocols import target_kind

    # the preset's backbone, size and layers, as the runner resolves them (from names: no dataset is opened)
    kind = target_kind(spec.protocol, spec.targets)
    settings = presets.resolve(cls, spec.preset, kind, spec.backbone, spec.method_config, spec.image_size)
    try:  # an unknown name is refused while planning, not by every point it would fail
        BACKBONES.get(settings.backbone)
    except ZsadError as exc:
        raise ZsadError(f"{where('backbone')}: {exc}") from None
    resolved = {
        f.name: getattr(spec, f.name)
        for f in dataclasses.fields(spec)
        if f.name not in ("out", "resume", "progress", "device", "num_workers", "label", "method_config")
    }
    layers = settings.layers or cls.feature_layers
    resolved.update(method=cls.name, backbone=settings.backbone, image_size=settings.image_size)
    resolved.update(layers=list(layers) if layers else None)
    resolved["method_config"] = config
    return spec, json.loads(json.dumps(resolved, sort_keys=True, default=str))


def points_of(grid: Grid) -> list[Point]:
    """Resolve every variant; two variants with the same resolved config are one point."""
    out: dict[str, Point] = {}

    def where(key: str) -> str:
        if grid.path is None:
            return "sweep"
        line = next((n for s in ("grid", "base") if (n := key_line(grid.text, s, key, strict=True))), 0)
        return f"{grid.path}:{line}" if line else str(grid.path)

    for v in grid.variants:
        spec, resolved = resolve(v, where)
        pid = _digest(resolved)
        if pid in out:
            continue
        label = v.label or spec.label or spec.method
        if v.label and spec.label:
            label = f"{spec.label} {v.label}"
        options = {**v.options, "label": label}
        out[pid] = Point(pid, label, v.name or pid, options, v.axes, resolved)
    return list(out.values())


# ---------------------------------------------------------------------------------------------- stages
def _point_data(spec: Any) -> list[tuple[str, list[Any]]]:
    """(dataset spec, samples) units in the order and grouping the runner extracts them for a point.

    The auxiliary fit set is one unit, each target category's test images another, as in
    ``Runner.source``; fill shards keep these units batch-aligned, so every image sits in the same
    extraction batch as in a standalone run and its cached features are bit-identical.
    """
    from zsad_bench.data import open_dataset
    from zsad_bench.detector import LearningType, get_method_class
    from zsad_bench.protocols import resolve_protocol
    from zsad_bench.runner import open_datasets

    cls = get_method_class(spec.method)
    out = []
    for leg in resolve_protocol(spec.protocol, spec.aux, spec.targets, spec.data_root):
        if cls.learning_type is LearningType.ZERO_SHOT:
            aux = open_datasets(leg.aux, spec.aux_categories, spec.aux_split, "auxiliary")
            out.append(("+".join(leg.aux), aux.samples))
        for target in leg.targets:
            ds = open_dataset(target)
            for category in ds.categories:
                if not spec.categories or category in spec.categories:
                    out.append((target, ds.select([category], "test").samples))
    return out


def make_plan(points: list[Point], fill_shard: int = DEFAULT_FILL_SHARD) -> Plan:
    """Shared stages of ``points``: feature-cache shards per (backbone, size, layers, dataset), fit leaders."""
    from zsad_bench.detector import get_method_class

    by_key: dict[str, tuple[dict[str, Any], dict[tuple[Path, ...], list[Any]]]] = {}
    deps: dict[str, list[str]] = {}
    leaders: dict[str, str] = {}
    groups: dict[str, str] = {}
    for p in points:
        spec = spec_from_options(p.options)
        cls = get_method_class(spec.method)
        r = p.resolved
        backbone = {
            "backbone": r["backbone"],
            "image_size": r["image_size"],
            "weights": r["weights"],
            "backbone_kwargs": r["backbone_kwargs"],
        }
        keys = []
        if not cls.needs_images and spec.use_cache:
            feat = {**backbone, "layers": r["layers"], "precision": r["precision"]}
            for dataset, samples in _point_data(spec):
                key = _digest([feat, dataset])
                # the runner's extraction batch size, so a point's features do not depend on who extracted them
                batch = max(spec.batch_size, 8)
                entry = by_key.setdefault(key, ({**feat, "dataset": dataset, "batch_size": batch}, {}))
                entry[1].setdefault(tuple(s.image_path for s in samples), samples)
                keys.append(key)
        deps[p.id] = sorted(set(keys))
        family = cls.artifacts_family or cls.name
        if family in SHARED_FITS:
            shared = {k: r["method_config"][k] for k in SHARED_FITS[family]}
            data = {k: r[k] for k in ("protocol", "aux", "targets", "data_root", "aux_categories", "aux_split")}
            group = _digest([family, backbone, data, r["seeds"], shared])
            leaders[p.id] = groups.setdefault(group, p.id)
    fills, shard_ids = [], {}
    for key, (feat, units) in by_key.items():
        total = sum(len(u) for u in units.values())
        stages = shard_stages(key, feat, list(units.values()), -(-total // fill_shard))
        fills += stages
        shard_ids[key] = [st.id for st in stages]
    deps = {pid: [s for k in keys for s in shard_ids[k]] for pid, keys in deps.items()}
    return Plan(points, fills, leaders, deps)


def shard_stages(key: str, feat: dict[str, Any], units: list[list[Any]], shards: int) -> list[Stage]:
    """Up to ``shards`` fill stages over ``units`` (lists of samples extracted together).

    Units are cut into blocks whose sizes are multiples of the extraction batch size (so batches are the
    same as extracting the whole unit) and blocks go to the least-loaded shard.
    """
    batch = int(feat["batch_size"])
    total = sum(len(u) for u in units)
    per_shard = -(-total // max(1, shards))
    size = max(batch, -(-per_shard // batch) * batch)
    blocks = [u[i : i + size] for u in units for i in range(0, len(u), size)]
    groups: list[list[list[Any]]] = [[] for _ in range(max(1, min(shards, len(blocks))))]
    for block in blocks:
        min(groups, key=lambda g: sum(map(len, g))).append(block)
    n = len(groups)
    return [
        Stage(f"fill-{key}-{i + 1}of{n}", "fill", {**feat, "shard": f"{i + 1}/{n}", "blocks": g})
        for i, g in enumerate(groups)
    ]


def feature_spec(
    method: str | None, backbone: str, image_size: int | None, weights: str | None, precision: str
) -> dict[str, Any]:
    """The feature-cache group a method's points read: backbone, resolved image size, layers (paper preset),
    precision."""
    from zsad_bench import presets
    from zsad_bench.detector import get_method_class

    layers = None
    if method:
        settings = presets.resolve(get_method_class(method), "paper", None, backbone, None, image_size)
        image_size, layers = settings.image_size, list(settings.layers) if settings.layers else None
    return {
        "backbone": backbone,
        "image_size": image_size,
        "weights": weights,
        "backbone_kwargs": {},
        "layers": layers,
        "precision": precision,
    }
