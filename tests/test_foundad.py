"""FoundAD plugin: projector, CutPaste, residual scoring and a short fit, on a tiny stand-in backbone."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from zsad_bench.backbones.base import Backbone, Capabilities, Features, Preprocess
from zsad_bench.data.records import Sample
from zsad_bench.detector import FitContext, LearningType, create_method, get_method_class
from zsad_bench.errors import ZsadError
from zsad_bench.methods.foundad import FoundAD, Projector, Synthesis, paste, patch_residuals, top_k_mean
from zsad_bench.presets import resolve
from zsad_bench.source import FeatureSource


class ConvBackbone(Backbone):
    """A fixed random 4x4-patch convolution: (B, 3, S, S) -> (B, S/4, S/4, 8)."""

    name = "conv-stub"
    patch_size = 4
    embed_dim = 8
    default_layers = ("last",)
    capabilities = Capabilities(None, ("last",), global_token=False, extra_layers=("last",))

    def __init__(self, size: int = 32) -> None:
        super().__init__()
        self.preprocess = Preprocess(size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))
        self.requires_grad_(False)

    def forward_features(self, images: torch.Tensor, layers=None) -> Features:
        return Features({"last": self.conv(images).permute(0, 2, 3, 1)})


def _source(images: torch.Tensor, labels: list[int] | None = None) -> FeatureSource:
    labels = labels or [0] * len(images)
    samples = [Sample(Path(f"{i}.png"), "cat", labels[i], None, "good", "train") for i in range(len(images))]
    return FeatureSource(samples, images.shape[-1], None, images=lambda s: images[int(s.image_path.stem)])


def _linear_params(i: int, o: int) -> int:
    return i * o + o


def test_projector_shapes_and_parameter_count() -> None:
    proj = Projector(in_dim=10, dim=8, depth=2, heads=2)
    assert proj(torch.randn(3, 5, 10)).shape == (3, 5, 10)
    block = 2 * 8 + _linear_params(8, 24) + _linear_params(8, 8) + 2 * 8 + _linear_params(8, 32) + _linear_params(32, 8)
    want = _linear_params(10, 8) + 2 * block + 2 * 8 + _linear_params(8, 10)
    assert sum(p.numel() for p in proj.parameters()) == want
    # the official size: 384 wide, 6 blocks, on 768-d (ViT-B) tokens -> 11.2M parameters
    big = 6 * (4 * 384 + _linear_params(384, 1152) + _linear_params(384, 384) + 2 * _linear_params(384, 1536) - 1152)
    assert big + _linear_params(768, 384) + 2 * 384 + _linear_params(384, 768) == pytest.approx(11.24e6, rel=1e-3)


def test_projector_long_skip() -> None:
    proj = Projector(in_dim=4, dim=4, depth=3, heads=1)
    for blk in proj.blocks:  # zeroed blocks are identities (internal residuals): x_i = x_{i-1} + x0
        for p in blk.parameters():
            torch.nn.init.zeros_(p)
    seen = []
    proj.norm.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    x = torch.randn(2, 3, 4)
    proj(x)
    torch.testing.assert_close(seen[0], 4 * proj.embed(x))


def test_paste_mask() -> None:
    img = torch.zeros(3, 10, 12)
    out, mask = paste(img, torch.ones(3, 4, 5), top=2, left=6)
    assert mask.sum().item() == 20 and mask[2:6, 6:11].all()
    assert (out[:, mask] == 1).all() and (out[:, ~mask] == 0).all()


def test_cutpaste_copies_a_region_of_the_image() -> None:
    img = torch.arange(3 * 40 * 40, dtype=torch.float32).view(3, 40, 40) / 4800.0
    kinds = set()
    for seed in range(12):
        out, mask = Synthesis((0.5,) * 3, (0.25,) * 3, random.Random(seed), jitter=0.0).cutpaste(img)
        assert torch.equal(out[:, ~mask], img[:, ~mask])  # nothing changes outside the mask
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        top, left, h, w = rows[0].item(), cols[0].item(), len(rows), len(cols)
        assert mask.sum().item() == h * w  # the mask is one rectangle
        region = out[:, top : top + h, left : left + w]
        found = any(
            torch.equal(region, img[:, y : y + h, x : x + w]) for y in range(40 - h + 1) for x in range(40 - w + 1)
        )
        kinds.add("normal" if found else "scar")
        if found:
            assert 0.02 * 1600 * 0.8 <= h * w <= 0.25 * 1600 * 1.2
    assert kinds == {"normal", "scar"}  # rotated scars are not plain copies


def test_augment_is_identity_flip_rotation_or_appearance() -> None:
    img = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    variants = [img, img.flip(-1), img.flip(-2), torch.rot90(img, 1, (-2, -1)), torch.rot90(img, 3, (-2, -1))]
    kinds = {"identity": 0, "orientation": 0, "appearance": 0}
    for seed in range(60):
        out = Synthesis((0.5,) * 3, (0.5,) * 3, random.Random(seed)).augment(img)
        assert out.shape == img.shape
        same = [torch.equal(out, v) for v in variants]
        kinds["identity" if same[0] else "orientation" if any(same) else "appearance"] += 1
    assert 15 <= kinds["identity"] <= 45  # unchanged with probability 0.7 * 0.7
    assert kinds["orientation"] > 0 and kinds["appearance"] > 0


def test_residual_and_top_k_against_loops() -> None:
    gen = torch.Generator().manual_seed(1)
    feats, pred = torch.randn(2, 6, 3, generator=gen), torch.randn(2, 6, 3, generator=gen)
    res = patch_residuals(feats, pred)
    for b in range(2):
        for n in range(6):
            want = sum((feats[b, n, c].item() - pred[b, n, c].item()) ** 2 for c in range(3)) / 3
            assert res[b, n].item() == pytest.approx(want, rel=1e-5)
    vals = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0]])
    assert top_k_mean(vals, 2).item() == pytest.approx(4.5)
    assert top_k_mean(vals, 10).item() == pytest.approx(3.0)


def test_short_fit_decreases_loss_and_predicts_residuals() -> None:
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(4, 3, 32, 32, generator=gen) * 0.3
    backbone = ConvBackbone(32)
    det = create_method("foundad", backbone, steps=30, width=16, depth=2, heads=2, top_k=3, lr=3e-3)
    assert det.learning_type is LearningType.FEW_SHOT and det.needs_images
    with torch.random.fork_rng():  # dropout draws from the global generator
        torch.manual_seed(0)
        det.fit(_source(images), FitContext(torch.device("cpu"), seed=5, progress=False))
    assert len(det.losses) == 30
    assert np.mean(det.losses[-5:]) < 0.8 * np.mean(det.losses[:5])

    pred = det.predict(next(_source(images[:2]).batches(2)))
    assert pred.maps.shape == (2, 32, 32)
    tokens = backbone.forward_features(images[:2]).layer().reshape(2, 64, 8)
    with torch.no_grad():
        out = det.projector(tokens)
    res = ((tokens - out) ** 2).mean(-1)
    want = np.sort(res.numpy(), axis=1)[:, -3:].mean(1)
    np.testing.assert_allclose(pred.scores.numpy(), want, rtol=1e-5)
    # bilinear (align_corners=False) at stride 4: pixels 0 and 1 sample at or before patch 0's centre
    torch.testing.assert_close(pred.maps[0, :2, :2], res[0, 0].expand(2, 2))

    clone = FoundAD(backbone, det.config)
    clone.load_state_dict(det.state_dict())
    torch.testing.assert_close(clone.predict(next(_source(images[:2]).batches(2))).scores, pred.scores)


class _SpyBackbone(ConvBackbone):
    """Records the batch size and layer names of every backbone call; declares 12 blocks with normed layers."""

    capabilities = SimpleNamespace(num_blocks=12, normed_layers=True, text=False)

    def __init__(self) -> None:
        super().__init__(32)
        self.calls: list[tuple[int, tuple[str, ...] | None]] = []

    def forward_features(self, images: torch.Tensor, layers=None) -> Features:
        self.calls.append((images.shape[0], None if layers is None else tuple(layers)))
        grid = self.conv(images).permute(0, 2, 3, 1)
        return Features({name: grid for name in (layers or ("last",))})


def test_one_shot_trains_on_batches_of_eight_augmented_copies() -> None:
    """Official: 8 images per step (a drop_last loader over all shots), here 8 copies of a single shot."""
    spy = _SpyBackbone()
    det = create_method("foundad", spy, steps=3, width=16, depth=1, heads=2, p_cutpaste=0.0, dropout=0.0)
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    det.fit(_source(image), FitContext(torch.device("cpu"), seed=1, progress=False))
    assert [n for n, _ in spy.calls] == [8, 8, 8]
    # third-last of 12 blocks through the final norm: get_intermediate_layers(n=3)[0]
    assert {layers for _, layers in spy.calls} == {("10:norm",)}
    # cycling shuffled passes: with 3 shots every step holds each shot 2 or 3 times
    steps = det.batch_indices(3, torch.Generator().manual_seed(0))
    assert all(len(b) == 8 and sorted(set(b)) == [0, 1, 2] for b in steps)
    flat = [i for b in steps for i in b]
    for start in range(0, 24, 3):  # every window of one pass is a permutation of the shots
        assert sorted(flat[start : start + 3]) == [0, 1, 2]


def test_init_keeps_no_depth_rescale() -> None:
    """The official _init_predictor re-draws every Linear after fix_init_weight: all weights std 0.02."""
    torch.manual_seed(0)
    proj = Projector(in_dim=64, dim=64, depth=4, heads=2)
    for blk in proj.blocks:
        for lin in (blk.proj, blk.fc2):
            assert lin.weight.std().item() == pytest.approx(0.02, rel=0.06)
            assert lin.bias.abs().max().item() == 0.0


def test_paper_preset_and_per_dataset_top_k() -> None:
    cls = get_method_class("foundad")
    paper = resolve(cls, "paper", "visa")
    assert (paper.backbone, paper.image_size) == ("dinov3", 512)
    assert paper.config_overrides == {"projector_scope": "dataset", "top_k": 6}
    assert resolve(cls, "paper", "mvtec").config_overrides["top_k"] == 10
    det = create_method("foundad", ConvBackbone(), **paper.config_overrides)
    assert det.fit_scope == "dataset" and det.config.top_k == 6
    assert create_method("foundad", ConvBackbone()).fit_scope == "category"


def test_user_errors() -> None:
    small = FoundAD(ConvBackbone(), FoundAD.Config(width=16, depth=1, heads=2))
    small.projector = Projector(8, 16, 1, 2)
    with pytest.raises(ZsadError, match="does not match"):
        FoundAD(ConvBackbone()).load_state_dict(small.state_dict())
    with pytest.raises(ZsadError, match="top_k"):
        create_method("foundad", ConvBackbone(), top_k=0)
    with pytest.raises(ZsadError, match="projector_scope"):
        create_method("foundad", ConvBackbone(), projector_scope="image")
    with pytest.raises(ZsadError, match="before fit"):
        create_method("foundad", ConvBackbone()).predict(next(_source(torch.zeros(1, 3, 32, 32)).batches(1)))


@pytest.mark.slow
def test_synthetic_sets_end_to_end(tmp_path: Path) -> None:
    from zsad_bench.runner import RunSpec, run_experiment

    targets = ["synthetic:objects", "synthetic:textures"]
    tiny = {"steps": 2, "width": 16, "depth": 1, "heads": 2}
    spec = RunSpec("foundad", "effnet-lite0", None, targets=targets, categories=["nut", "mesh"], shots=1)
    spec.image_size, spec.method_config, spec.out, spec.progress = 64, tiny, tmp_path / "r.json", False
    res, _ = run_experiment(spec)
    assert sorted(r.category for r in res.records) == ["mesh", "nut"]
    for r in res.records:
        assert r.n_images == 25 and all(0.0 <= r.metrics[m] <= 1.0 for m in ("image_auroc", "pixel_auroc"))
