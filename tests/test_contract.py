"""Contract tests (timm style) over every registered method and every registered backbone.

Methods: on the tiny random config of each backbone they declare support for (checked through the registry with
``check_method_backbone``, nothing built), the Config parses back from its CLI strings, ``Prediction``s have the
documented shapes and dtypes, the same seed gives the same output, and ``state_dict`` round-trips into a fresh
instance. Backbones: every declared capability is honoured by the built model (each layer name returns a grid of
the declared kind, text tower and token-insertion hook present exactly when declared, global token as declared).
``dinov2-vits14``/``dinov2-vitb14`` share ``dinov2``'s tiny config (one architecture), so methods are run once on
it; their capabilities are checked on their own.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zsad_bench.backbones import Backbone, backbones_for, check_method_backbone, create_backbone, list_backbones
from zsad_bench.backbones.base import split_layer
from zsad_bench.backbones.testing import TINY_BACKBONES, tiny_config
from zsad_bench.data.records import Sample
from zsad_bench.detector import (
    Detector,
    FitContext,
    LearningType,
    Prediction,
    create_method,
    get_method_class,
    list_methods,
    parse_overrides,
)
from zsad_bench.errors import ZsadError
from zsad_bench.source import FeatureSource

# input sizes: a 4x4 patch grid for every ViT (patch 14 or 16) and for EfficientNet (32 px at stride 8)
SIZES = {"dinov2": 56, "dinov2-vits14": 56, "dinov2-vitb14": 56, "openclip": 56, "effnet-lite0": 32}
METHOD_BACKBONES = ("effnet-lite0", "dinov2", "dinov3", "siglip", "openclip", "openclip-vitb16plus")
# tiny but complete settings per shipped method (one epoch / a few steps); third-party methods run as configured
TINY_SETTINGS: dict[str, dict] = {
    "anomalyclip": {"epochs": 1, "depth": 2, "n_ctx": 4, "deep_len": 2},
    "foundad": {"steps": 2, "batch_size": 2, "width": 16, "depth": 1, "heads": 2},
    "spg": {"sae_width": 32, "sae_k": 4, "sae_epochs": 1, "auxk": 8, "guide_epochs": 1, "sae_batch_size": 4},
    "spg-topk": {
        "sae_width": 32,
        "sae_k": 4,
        "sae_epochs": 1,
        "auxk": 8,
        "guide_epochs": 1,
        "sae_batch_size": 4,
        "guide_topk": 4,
    },
    "visualad": {"epochs": 1, "layers": (1, 2)},
    "winclip": {"scales": (2,)},
    "winclipplus": {"scales": (2,)},
}


def size_of(name: str) -> int:
    return SIZES.get(name, 64)


@functools.cache
def tiny_backbone(name: str) -> Backbone:
    torch.manual_seed(0)
    config = {} if name == "effnet-lite0" else tiny_config(name)
    return create_backbone(name, config=config, image_size=size_of(name))


def _supported(method: str, backbone: str) -> bool:
    try:
        check_method_backbone(get_method_class(method), backbone)
    except ZsadError:
        return False
    return True


# Every plugin (shipped or installed through an entry point), not the stand-ins other test modules register.
PLUGINS = [m for m in list_methods() if not get_method_class(m).__module__.startswith("tests.")]
PAIRS = [(m, b) for m in PLUGINS for b in METHOD_BACKBONES if _supported(m, b)]


def _cli_string(value: object) -> str:
    """How a user writes ``value`` after ``--set key=``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple | list):
        return ",".join(_cli_string(v) for v in value)
    return str(value)


@pytest.mark.parametrize("method", PLUGINS)
def test_config_parses_back_from_cli_strings(method: str) -> None:
    cls = get_method_class(method)
    defaults = cls.Config()
    for f in dataclasses.fields(cls.Config):
        value = getattr(defaults, f.name)
        parsed = getattr(parse_overrides(cls, {f.name: _cli_string(value)}), f.name)
        assert parsed == value and type(parsed) is type(value), f.name


@pytest.mark.parametrize("method", PLUGINS)
def test_every_method_runs_on_some_backbone(method: str) -> None:
    assert any(m == method for m, _ in PAIRS), f"{method} supports none of {METHOD_BACKBONES}"


_IMAGES = Path(tempfile.mkdtemp(prefix="zsad-contract-"))


def _image_file(seed: int, i: int) -> Path:
    """A real (tiny) image file for a sample: methods may read the file's header (AnomalyDINO's original size)."""
    path = _IMAGES / f"{seed}-{i}.png"
    if not path.exists():
        Image.new("RGB", (24 + 8 * i, 16), (40 * i % 256, 90, 160)).save(path)
    return path


def _source(backbone: Backbone, cls: type[Detector], det: Detector, n: int, seed: int) -> FeatureSource:
    """``n`` random images (odd ones anomalous, with a square mask), their features in memory when needed."""
    size = backbone.image_size
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    samples = [Sample(_image_file(seed, i), "metal_nut", i % 2, None, "good", "test") for i in range(n)]
    index = {s.image_path: i for i, s in enumerate(samples)}

    def mask(sample: Sample, s: int) -> np.ndarray:
        m = np.zeros((s, s), bool)
        m[s // 4 : s // 2, s // 4 : s // 2] = bool(sample.label)
        return m

    features = None
    if not cls.needs_images:
        layers_for = getattr(cls, "layers_for", None)
        layers = layers_for(backbone.capabilities) if callable(layers_for) else cls.feature_layers
        with torch.no_grad():
            feats = backbone.forward_features(images, layers)

        def features(idx):
            return type(feats)({k: v[list(idx)] for k, v in feats.patches.items()}, feats.global_token[list(idx)])

    return FeatureSource(samples, size, features, mask, lambda s: images[index[s.image_path]])


def _predict(det: Detector, source: FeatureSource) -> Prediction:
    preds = [p for _, p in det.predict_source(source, batch_size=3)]
    return Prediction(torch.cat([p.maps for p in preds]), torch.cat([p.scores for p in preds]))


def seed_all(seed: int) -> None:
    """What the runner does before building and fitting a method (``runner.seed_everything``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _fitted(method: str, backbone: Backbone, seed: int) -> tuple[Detector, FeatureSource]:
    cls = get_method_class(method)
    seed_all(seed)
    det = create_method(method, backbone, **TINY_SETTINGS.get(method, {}))
    if cls.learning_type is not LearningType.TRAINING_FREE:
        data = _source(backbone, cls, det, 4, seed=1)
        det.fit(data, FitContext(torch.device("cpu"), seed=seed, progress=False))
    return det, _source(backbone, cls, det, 4, seed=2)


@pytest.mark.parametrize(("method", "backbone"), PAIRS)
def test_method_contract(method: str, backbone: str) -> None:
    bb = tiny_backbone(backbone)
    det, test = _fitted(method, bb, seed=3)
    pred = _predict(det, test)
    size = bb.image_size
    assert pred.maps.shape == (4, size, size) and pred.scores.shape == (4,)
    assert pred.maps.dtype == torch.float32 and pred.scores.dtype == torch.float32
    assert torch.isfinite(pred.maps).all() and torch.isfinite(pred.scores).all()

    again, _ = _fitted(method, bb, seed=3)  # same seed, fresh instance: same output
    repeat = _predict(again, test)
    torch.testing.assert_close(repeat.maps, pred.maps, rtol=0, atol=0)
    torch.testing.assert_close(repeat.scores, pred.scores, rtol=0, atol=0)

    state = det.state_dict()
    fresh = create_method(method, bb, **TINY_SETTINGS.get(method, {}))
    fresh.load_state_dict(state)
    restored = _predict(fresh, test)
    torch.testing.assert_close(restored.maps, pred.maps, rtol=0, atol=0)
    torch.testing.assert_close(restored.scores, pred.scores, rtol=0, atol=0)


BACKBONES_UNDER_TEST = [s.name for s in list_backbones() if s.name in (*TINY_BACKBONES, "effnet-lite0")]


def test_every_registered_backbone_has_a_tiny_config() -> None:
    assert sorted(BACKBONES_UNDER_TEST) == sorted(s.name for s in list_backbones())


@pytest.mark.parametrize("name", BACKBONES_UNDER_TEST)
def test_backbone_honours_declared_capabilities(name: str) -> None:
    spec = list_backbones(name)[0]
    declared = spec.capabilities
    bb = tiny_backbone(name)
    caps = bb.capabilities
    assert bb.name == name
    flags = ("normed_layers", "projected_layers", "text", "token_insertion", "global_token", "extra_layers")
    assert {f: getattr(caps, f) for f in flags} == {f: getattr(declared, f) for f in flags}
    assert (caps.num_blocks is None) == (declared.num_blocks is None)
    if declared.num_blocks is not None:  # the tiny config has 2 blocks; the default keeps its form
        assert [split_layer(n)[1] for n in caps.default_layers] == [split_layer(n)[1] for n in declared.default_layers]
        assert all(split_layer(n)[0] == caps.num_blocks for n in caps.default_layers)

    size = bb.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        feats = bb.forward_features(x, bb.layers)
        default = bb.forward_features(x)
    g = size // bb.patch_size
    tower_width = bb.tower.width if bb.tower is not None else None
    for layer in bb.layers:
        grid = feats.patches[layer]
        assert grid.shape[:3] == (2, g, g) and grid.dtype == torch.float32, layer
        if caps.num_blocks is not None:
            form = split_layer(layer)[1]
            expected = bb.embed_dim if form == "proj" or not caps.projected_layers else tower_width
            assert expected is None or grid.shape[3] == expected, layer
    assert tuple(default.patches) == bb.default_layers and default.layer().shape[3] == bb.embed_dim
    assert (default.global_token is not None) == declared.global_token
    with pytest.raises(ZsadError, match="unknown layer"):
        bb.forward_features(x, ["99"])

    assert (bb.text is not None) == declared.text
    if declared.text:
        emb = bb.encode_text(["a photo of a flawless object", "a photo of a damaged object"])
        assert emb.shape == (2, default.global_token.shape[1])
    else:
        with pytest.raises(ZsadError, match="no text tower"):
            bb.encode_text(["x"])

    assert (bb.tower is not None) == declared.token_insertion
    if declared.token_insertion:
        tower = bb.tower
        with torch.no_grad():
            tokens = tower.embed(x)
            assert tokens.shape == (2, tower.num_prefix_tokens + g * g, tower.width)
            extended = tower.insert(tokens, torch.zeros(3, tower.width))
            assert extended.shape == (2, 3 + tokens.shape[1], tower.width)
            h = tokens
            for i in range(1, tower.num_blocks + 1):
                h = tower.run_block(i, h)
            # the hook reproduces the backbone's own forward: last raw block and the global token
            torch.testing.assert_close(tower.pool(h), default.global_token, atol=1e-5, rtol=1e-5)
            last_raw = feats.patches[str(tower.num_blocks)]
            torch.testing.assert_close(h[:, tower.num_prefix_tokens :].reshape(last_raw.shape), last_raw)


def test_check_method_backbone_reads_needs_and_layers_from_the_registry() -> None:
    class Probe:
        name = "probe"
        needs_blocks = True

        @staticmethod
        def layers_for(caps):
            return (f"{caps.num_blocks}:norm",)

    check_method_backbone(Probe, "dinov2-vits14")  # asks for "12:norm", declared by the 12-block ViT-S
    with pytest.raises(
        ZsadError,
        match=r"'probe' does not run on backbone 'effnet-lite0': it needs transformer blocks; use --backbone dinov2",
    ):
        check_method_backbone(Probe, "effnet-lite0")

    class WantsProjection(Probe):
        @staticmethod
        def layers_for(caps):
            return ("1:proj",)

    check_method_backbone(WantsProjection, "openclip-vitb16plus")
    with pytest.raises(ZsadError, match=r"unknown layer\(s\) \['1:proj'\]; use block indices 1\.\.24"):
        check_method_backbone(WantsProjection, "dinov2")

    class Listed(Probe):
        supported_backbones = ("dinov3",)

    with pytest.raises(ZsadError, match=r"use --backbone dinov3$"):
        check_method_backbone(Listed, "dinov2")
    assert backbones_for(Listed) == ["dinov3"]
    assert backbones_for(get_method_class("winclip")) == ["openclip", "openclip-vitb16plus"]
    for method in PLUGINS:  # an explicit list never names a backbone lacking what the method needs
        cls = get_method_class(method)
        for name in cls.supported_backbones or ():
            check_method_backbone(cls, name)
