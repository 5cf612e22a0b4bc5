"""The Detector interface every method plugin implements, and the method registry.

A method declares its :class:`LearningType`, is fitted once through :meth:`Detector.fit` (on the
auxiliary set for zero-shot methods, on k normal images of the target category for few-shot ones,
never for training-free ones) and predicts per image an anomaly map and an image score.

Plugins register with :func:`register_method`; :func:`create_method` builds one by name,
:func:`list_methods` filters names with a shell pattern (like timm's ``list_models``).
"""

from __future__ import annotations

import enum
import sys
import traceback
import types
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import torch

from zsad_bench.backbones.base import Backbone, Features
from zsad_bench.data.records import Sample
from zsad_bench.errors import ZsadError
from zsad_bench.options import check_option, inference_options, option_help, parse_overrides
from zsad_bench.registry import Registry


class LearningType(enum.StrEnum):
    """How a method may use data before it scores a target category."""

    TRAINING_FREE = "training-free"  # nothing but the test image (and possibly text prompts)
    ZERO_SHOT = "zero-shot"  # trained on a labelled auxiliary dataset, never on target categories
    FEW_SHOT = "few-shot"  # k normal images of the target category


@dataclass
class Batch:
    """A batch handed to a detector.

    ``features`` come from the feature cache (absent for methods with ``needs_images``);
    ``images`` are the backbone-preprocessed ``(B, 3, S, S)`` images (only for ``needs_images``);
    ``masks`` are ``(B, S, S)`` float {0, 1} ground truth at the input size S, present only in
    training data (auxiliary set).
    """

    samples: list[Sample]
    features: Features | None
    images: torch.Tensor | None = None
    masks: torch.Tensor | None = None

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([s.label for s in self.samples])


class DataSource(Protocol):
    """Samples with cached features, iterable in batches; what ``fit`` and ``predict_source`` get."""

    samples: list[Sample]
    image_size: int

    def __len__(self) -> int: ...

    def batches(
        self, batch_size: int, shuffle: bool = False, seed: int = 0, masks: bool = False
    ) -> Iterator[Batch]: ...


@dataclass
class Prediction:
    """Per-image outputs at the method's input size S: ``maps`` ``(B, S, S)``, ``scores`` ``(B,)``."""

    maps: torch.Tensor
    scores: torch.Tensor

    def __post_init__(self) -> None:
        if self.maps.ndim != 3 or self.scores.ndim != 1 or self.maps.shape[0] != self.scores.shape[0]:
            raise ValueError(f"Prediction shapes maps {tuple(self.maps.shape)} scores {tuple(self.scores.shape)}")


@dataclass
class FitContext:
    """Run context a detector may use while fitting: device, seed, where to keep reusable artifacts."""

    device: torch.device
    seed: int = 111
    artifacts_dir: Path | None = None
    progress: bool = True
    log: Callable[[str], None] = print


class Detector(ABC):
    """Base class of method plugins. Subclasses set the class attributes and implement ``predict``.

    ``Config`` is a dataclass of the method's hyper-parameters (defaults = the paper/official code);
    ``create_method`` validates user overrides against it, and the fields' metadata (inference-only,
    bounds, choices, help) as described in :mod:`zsad_bench.options`.
    """

    name: ClassVar[str]
    display_name: ClassVar[str] = ""  # label in tables (default: name)
    learning_type: ClassVar[LearningType]
    paper: ClassVar[str] = ""
    default_backbone: ClassVar[str] = "effnet-lite0"
    supported_backbones: ClassVar[tuple[str, ...] | None] = None  # None: any registered backbone
    needs_images: ClassVar[bool] = False
    needs_text: ClassVar[bool] = False  # a text tower (CLIP methods)
    needs_token_insertion: ClassVar[bool] = False  # inserts learned tokens into the ViT (backbone.tower)
    needs_blocks: ClassVar[bool] = False  # reads transformer blocks (a ViT)
    # Zero-shot methods learn from the auxiliary set's anomalous pixels; False for one trained on image labels.
    needs_aux_masks: ClassVar[bool] = True
    feature_layers: ClassVar[tuple[str, ...] | None] = None  # None: the backbone's default layers
    # Variants of one method share reusable artifacts (e.g. spg-topk reuses spg's SAEs); default: name.
    artifacts_family: ClassVar[str] = ""
    # What the method's paper ran (zsad_bench.presets.PaperSetting: backbone, size, layers, protocol options);
    # None: default_backbone at its own size with feature_layers stands in (``--preset paper``).
    paper_setting: ClassVar[Any] = None
    # Options applied from the *target* dataset's kind ("mvtec", "visa"), under every preset.
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    # Controls (floors such as a random scorer) are listed apart and never marked best in tables.
    is_control: ClassVar[bool] = False

    @dataclass
    class Config:
        pass

    def __init__(self, backbone: Backbone, config: Config | None = None, device: str | torch.device = "cpu") -> None:
        self.backbone = backbone
        self.config = config if config is not None else type(self).Config()
        self.device = torch.device(device)

    @property
    def fit_scope(self) -> str:
        """Few-shot methods: one fit per target ``category`` (default) or per target ``dataset`` (the k shots of
        every category at once, e.g. FoundAD's one projector across categories)."""
        return "category"

    @classmethod
    def layers_for(cls, capabilities: Any) -> tuple[str, ...] | None:
        """The layers this method reads on a backbone with ``capabilities`` (default :attr:`feature_layers`)."""
        return cls.feature_layers

    def fit(self, data: DataSource, ctx: FitContext) -> None:
        """Learn from ``data``: the auxiliary set (zero-shot) or k normal references (few-shot).

        Training-free methods keep this default, which the runner never calls.
        """
        if self.learning_type is not LearningType.TRAINING_FREE:
            raise ZsadError(f"method '{self.name}' ({self.learning_type}) must implement fit()")

    @abstractmethod
    def predict(self, batch: Batch) -> Prediction:
        """Anomaly maps ``(B, S, S)`` and image scores ``(B,)`` for one batch of a target category."""

    def predict_source(self, data: DataSource, batch_size: int = 8) -> Iterator[tuple[Batch, Prediction]]:
        """Predict a whole target category. Transductive methods (MuSc) override this."""
        for batch in data.batches(batch_size):
            yield batch, self.predict(batch)

    def state_dict(self) -> dict[str, Any]:
        """Everything ``fit`` learned, as tensors/plain values (empty for training-free methods)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (methods that learn something override both)."""
        if state:
            raise ZsadError(f"method '{self.name}' has no learned state, but a checkpoint holds {sorted(state)}")

    def summary(self) -> dict[str, float]:
        """Extra per-run numbers stored with the results (e.g. SPG's guide sparsity)."""
        return {}


__all__ = ["check_option", "inference_options", "option_help", "parse_overrides"]  # re-exported

D = TypeVar("D", bound=type[Detector])

METHODS: Registry[type[Detector]] = Registry("method", "zsad_bench.methods")


def register_method(cls: D) -> D:
    """Class decorator: register a :class:`Detector` subclass under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Detector)):
        raise TypeError("register_method decorates Detector subclasses")
    METHODS.register(cls.name, cls)
    return cls


def list_methods(pattern: str = "*", learning_type: LearningType | str | None = None) -> list[str]:
    """Registered method names matching ``pattern`` (and ``learning_type`` when given)."""
    names = METHODS.names(pattern)
    if learning_type is not None:
        names = [n for n in names if METHODS.get(n).learning_type == LearningType(learning_type)]
    return names


def get_method_class(name: str) -> type[Detector]:
    return METHODS.get(name)


def create_method(name: str, backbone: Backbone, device: str | torch.device = "cpu", **overrides: Any) -> Detector:
    """Build method ``name`` on ``backbone`` with config overrides (unknown keys are an error)."""
    from zsad_bench.backbones.base import check_method_capabilities

    cls = get_method_class(name)
    check_method_capabilities(cls, getattr(backbone, "capabilities", None), backbone.name)
    return cls(backbone, parse_overrides(cls, overrides), device)


def check_backbone(cls: type[Detector], backbone_name: str) -> None:
    """Refuse a backbone whose declared capabilities the method lacks (text tower, token insertion, layers)."""
    from zsad_bench.backbones.base import check_method_backbone

    check_method_backbone(cls, backbone_name)


class PluginError(ZsadError):
    """A method plugin's own exception, reported as the plugin's: method, its file:line, one line.

    The original exception is the ``__cause__``; ``zsad-bench --debug`` prints its full traceback.
    """


def plugin_call(detector: Detector, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a plugin's ``fn`` (``fit``, ``predict``, ...) turning its own exceptions into :class:`PluginError`.

    A generator result (``predict_source``) is wrapped so exceptions raised while iterating it are
    reported the same way. ``ZsadError`` (a plugin refusing bad input with its own message) passes as is.
    """
    try:
        out = fn(*args, **kwargs)
    except ZsadError:
        raise
    except Exception as exc:
        raise _plugin_error(detector, what, exc) from exc
    if isinstance(out, types.GeneratorType):
        return _guarded(detector, what, out)
    return out


def _guarded(detector: Detector, what: str, gen: Iterator[Any]) -> Iterator[Any]:
    try:
        yield from gen
    except ZsadError:
        raise
    except Exception as exc:
        raise _plugin_error(detector, what, exc) from exc


def _plugin_error(detector: Detector, what: str, exc: BaseException) -> PluginError:
    frames = traceback.extract_tb(exc.__traceback__)
    module = sys.modules.get(type(detector).__module__)
    source = getattr(module, "__file__", None)
    own = [fr for fr in frames if source and Path(fr.filename) == Path(source)]
    where = (own or frames)[-1] if frames else None
    at = f" at {where.filename}:{where.lineno}" if where else ""
    text = (str(exc).strip().splitlines() or [""])[0]
    return PluginError(
        f"method '{detector.name}' failed in {what}(){at}: {type(exc).__name__}: {text}; "
        "this is the plugin's own error, run with --debug for the traceback"
    )
