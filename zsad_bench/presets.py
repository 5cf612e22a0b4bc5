"""Run presets: each method at its paper's settings (``paper``) or all methods on one backbone (``matched``).

A method class declares what its paper ran (:class:`PaperSetting` in ``paper_setting``: backbone, input
size, layers, method options that belong to the paper's protocol) and its per-target-dataset options
(``dataset_defaults``, keyed by the *target* dataset kind, ``"mvtec"`` or ``"visa"``). :func:`resolve`
turns a preset, the target's kind and the user's explicit choices into the effective settings the runner
builds with and records in the results file (``config["preset"]``).

Precedence, lowest first: the method's ``Config`` defaults < the paper's protocol options < the target's
``dataset_defaults`` < the preset's own overrides (``control``) < the user's ``--set``. An explicit
``--backbone`` / ``--image-size`` always wins over the preset's.

Presets:

* ``paper`` (default): backbone, size and layers of the method's paper (``paper_setting``).
* ``matched``: the backbone and size being compared (the user's ``--backbone``/``--image-size``, else
  :data:`MATCHED_BACKBONE` at its own size); layers are what the method picks on that backbone
  (``layers_for``); method options (paper protocol, per-dataset) are the same as under ``paper``, so
  methods differ only in the method.
* ``control``: a method's floor variant (e.g. ``spg`` with untrained guides, ``guide_epochs=0``), at its
  paper settings; only methods listed in :data:`CONTROL_PRESETS` have one.

``cls`` below is a :class:`zsad_bench.detector.Detector` subclass, which declares ``paper_setting`` (None:
its ``default_backbone`` at the backbone's own input size with ``feature_layers`` stands in),
``dataset_defaults``, ``is_control`` and ``layers_for``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zsad_bench.errors import ZsadError

PRESETS: tuple[str, ...] = ("paper", "matched", "control")
DATASET_KINDS: tuple[str, ...] = ("mvtec", "visa")
# The backbone a matched comparison runs on when the user names none: SPG's (the method being compared).
MATCHED_BACKBONE = "dinov3"
# ... and for methods that need a text tower: the CLIP ViT-L/14@336 of the SPG paper's comparison tables.
MATCHED_TEXT_BACKBONE = "openclip"
# Named control variants of real methods: preset "control" of method NAME applies these options.
CONTROL_PRESETS: dict[str, dict[str, Any]] = {
    "spg": {"guide_epochs": 0},  # untrained (randomly initialised) guides: the floor of SPG's training
    "spg-topk": {"guide_epochs": 0},
}


@dataclass(frozen=True)
class PaperSetting:
    """What a method's paper ran: registered backbone name, input size (None: the backbone's own), layers.

    ``layers`` None means the method picks them from the backbone (``layers_for``); ``config`` holds
    method options that are part of the paper's protocol but not the plugin's plain default (e.g.
    FoundAD's one projector for all categories); ``note`` is a short human description.
    """

    backbone: str
    image_size: int | None = None
    layers: tuple[str, ...] | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class ResolvedSettings:
    """Effective settings of one method on one target: what to build and what to record."""

    backbone: str
    image_size: int | None
    layers: tuple[str, ...] | None
    config_overrides: dict[str, Any]
    notes: tuple[str, ...]
    preset: str = "paper"

    def record(self) -> dict[str, Any]:
        """JSON-ready form for the results file (``config["preset"]``)."""
        return {
            "name": self.preset,
            "backbone": self.backbone,
            "image_size": self.image_size,
            "layers": None if self.layers is None else list(self.layers),
            "config_overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in self.config_overrides.items()},
            "notes": list(self.notes),
        }


def dataset_kind(spec: str) -> str | None:
    """Kind of a dataset spec for ``dataset_defaults``: ``mvtec:PATH``/``mvtec`` -> "mvtec", ``visa...`` -> "visa".

    Anything else (``folder:``, ``meta:``, synthetic sets) has no kind (no per-dataset defaults) unless the
    caller passes one to :func:`resolve` explicitly.
    """
    scheme = spec.split(":", 1)[0].strip().lower()
    return scheme if scheme in DATASET_KINDS else None


def paper_setting(cls: type) -> PaperSetting:
    """The class's declared paper setting, or its defaults standing in for one."""
    return cls.paper_setting or PaperSetting(cls.default_backbone, None, cls.feature_layers)


def matched_backbone(cls: type) -> str:
    """:data:`MATCHED_BACKBONE`; for a method that cannot run on it (text methods) :data:`MATCHED_TEXT_BACKBONE`
    when it runs there (the SPG paper's CLIP comparisons), else its paper's backbone."""
    supported = cls.supported_backbones
    if supported is None or MATCHED_BACKBONE in supported:
        return MATCHED_BACKBONE
    if MATCHED_TEXT_BACKBONE in supported:
        return MATCHED_TEXT_BACKBONE
    return paper_setting(cls).backbone


def is_control(cls: type) -> bool:
    return cls.is_control


def backbone_capabilities(name: str) -> Any:
    """``capabilities`` of registered backbone ``name`` without building it (None for an unknown name, which
    the runner refuses with its own message)."""
    from zsad_bench.backbones import BACKBONES

    try:
        return BACKBONES.get(name).capabilities
    except ZsadError:
        return None


def resolve(
    cls: type,
    preset: str = "paper",
    target_kind: str | None = None,
    backbone: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    image_size: int | None = None,
) -> ResolvedSettings:
    """Effective backbone, input size, layers and option overrides of method ``cls`` under ``preset``.

    ``target_kind`` is the target dataset's kind (:func:`dataset_kind`); ``backbone``/``image_size`` are
    the user's explicit choices (None: the preset decides); ``overrides`` the user's ``--set`` options.
    """
    if preset not in PRESETS:
        raise ZsadError(f"unknown preset '{preset}'; use one of {', '.join(PRESETS)}")
    if target_kind is not None and target_kind not in DATASET_KINDS:
        raise ZsadError(f"unknown dataset kind '{target_kind}'; use one of {', '.join(DATASET_KINDS)}")
    name = cls.name
    paper = paper_setting(cls)
    notes: list[str] = []
    if preset == "matched":
        chosen = backbone or matched_backbone(cls)
        size = image_size
        layers = cls.layers_for(backbone_capabilities(chosen))
        notes.append(f"matched: backbone {chosen} at {size or 'its own'} px")
        if backbone is None and chosen != MATCHED_BACKBONE:
            notes.append(f"{name} runs only on {', '.join(cls.supported_backbones)}: kept its paper backbone")
    else:
        chosen = backbone or paper.backbone
        size = image_size if image_size is not None else (paper.image_size if chosen == paper.backbone else None)
        layers = paper.layers if chosen == paper.backbone and paper.layers is not None else None
        if layers is None:
            layers = cls.layers_for(backbone_capabilities(chosen))
        if chosen != paper.backbone:
            notes.append(f"--backbone {chosen} replaces the paper's {paper.backbone}")
        if paper.note:
            notes.append(f"paper: {paper.note}")
    config: dict[str, Any] = dict(paper.config)
    if paper.config:
        notes.append("paper protocol: " + _fmt(paper.config))
    per_dataset = cls.dataset_defaults
    if target_kind is not None and target_kind in per_dataset:
        config.update(per_dataset[target_kind])
        notes.append(f"{target_kind} defaults: {_fmt(per_dataset[target_kind])}")
    if preset == "control":
        if name not in CONTROL_PRESETS:
            have = ", ".join(sorted(CONTROL_PRESETS))
            raise ZsadError(f"method '{name}' has no control preset; use --preset paper or matched (controls: {have})")
        config.update(CONTROL_PRESETS[name])
        notes.append(f"control: {_fmt(CONTROL_PRESETS[name])}")
    if overrides:
        config.update(overrides)
        notes.append(f"--set {_fmt(overrides)}")
    return ResolvedSettings(chosen, size, layers, config, tuple(notes), preset)


def describe(cls: type) -> list[str]:
    """Human-readable lines on both presets of ``cls`` (``zsad-bench list methods --details``)."""
    paper = paper_setting(cls)
    size = f"{paper.image_size} px" if paper.image_size else "the backbone's own input size"
    lines = [
        f"paper preset: backbone {paper.backbone}, {size}, "
        f"layers {','.join(paper.layers) if paper.layers else 'chosen per backbone'}"
        + (f", options {_fmt(paper.config)}" if paper.config else "")
    ]
    if paper.note:
        lines.append(f"  {paper.note}")
    lines.append(
        f"matched preset: --backbone (default {matched_backbone(cls)}) and --image-size being compared, "
        "layers per backbone"
    )
    for kind, opts in cls.dataset_defaults.items():
        lines.append(f"target {kind}: {_fmt(opts)} (both presets)")
    name = cls.name
    if name in CONTROL_PRESETS:
        lines.append(f"control preset: {_fmt(CONTROL_PRESETS[name])} (a floor, not a method)")
    return lines


def _fmt(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in options.items())
