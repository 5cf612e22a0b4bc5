"""effnet-lite0: strict loading of the packaged ImageNet weights, a sane prediction, and the patch grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import ImageNetInfo

from zsad_bench.backbones import create_backbone, list_backbones
from zsad_bench.backbones.effnet import convert_state_dict, packaged_weights
from zsad_bench.data.io import load_image
from zsad_bench.errors import ZsadError

# ImageNet-1k indices: beer bottle, pill bottle, pop bottle, water bottle, wine bottle
BOTTLES = (440, 720, 737, 898, 907)
# round vessels seen from above: cup, coffee mug, beer glass, red wine, goblet
VESSELS = (968, 504, 441, 966, 572, *BOTTLES)


@pytest.fixture(scope="module")
def effnet():
    return create_backbone("effnet-lite0")


def test_registered_offline_default() -> None:
    spec = {s.name: s for s in list_backbones()}["effnet-lite0"]
    assert spec.offline and spec.image_size == 224 and not spec.has_text


def test_checkpoint_maps_one_to_one_onto_timm() -> None:
    raw = torch.load(packaged_weights(), map_location="cpu", weights_only=True)
    converted = convert_state_dict(raw)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert set(converted) == set(reference)
    assert all(converted[k].shape == reference[k].shape for k in reference)
    # spot checks of the renaming, written out by hand
    assert torch.equal(converted["blocks.6.0.conv_pwl.weight"], raw["_blocks.15._project_conv.weight"])
    assert torch.equal(converted["blocks.3.2.bn2.running_var"], raw["_blocks.7._bn1.running_var"])
    assert torch.equal(converted["blocks.0.0.conv_pw.weight"], raw["_blocks.0._project_conv.weight"])
    assert torch.equal(converted["classifier.bias"], raw["_fc.bias"])


def test_strict_loading_rejects_incomplete_checkpoint(tmp_path: Path) -> None:
    raw = torch.load(packaged_weights(), map_location="cpu", weights_only=True)
    del raw["_blocks.3._bn1.bias"]
    bad = tmp_path / "partial.pth"
    torch.save(raw, bad)
    with pytest.raises(ZsadError, match=r"partial\.pth.*blocks\.2\.0\.bn2\.bias"):
        create_backbone("effnet-lite0", weights=str(bad))
    with pytest.raises(ZsadError, match="not found"):
        create_backbone("effnet-lite0", weights=str(tmp_path / "missing.pth"))


@pytest.mark.realmini
def test_classifies_mvtec_bottle_sensibly(effnet, realmini: Path) -> None:
    """Top-down bottle photos: the top-5 holds a vessel class; bottle classes get 10x their chance mass."""
    files = sorted((realmini / "mvtec_ad" / "bottle" / "test" / "good").glob("*.png"))[:8]
    x = torch.stack([effnet.preprocess(load_image(f)) for f in files])
    with torch.inference_mode():
        probs = effnet.model(x).softmax(-1)
    names = ImageNetInfo()
    top5 = probs[0].topk(5).indices.tolist()
    assert set(top5) & set(VESSELS), [names.index_to_description(i) for i in top5]
    assert probs[:, list(BOTTLES)].sum(1).mean() > 10 * len(BOTTLES) / 1000


def test_mid_grid_matches_timm_intermediates(effnet) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 96)
    feats = effnet.forward_features(x, ["mid", "4", "1"])
    assert feats.patches["mid"].shape == (2, 8, 12, 152) and effnet.embed_dim == 152
    assert feats.global_token.shape == (2, 1280)
    with torch.inference_mode():
        s1, s2, s4 = effnet.model.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)
    assert s1.shape[1:] == (24, 16, 24) and s2.shape[1:] == (40, 8, 12) and s4.shape[1:] == (112, 4, 6)

    def neighbourhood_mean(t: torch.Tensor) -> torch.Tensor:
        """3x3 mean over the valid neighbours, one position at a time."""
        out = torch.empty_like(t)
        h, w = t.shape[-2:]
        for i in range(h):
            for j in range(w):
                out[..., i, j] = t[..., max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].mean((-2, -1))
        return out

    up = F.interpolate(neighbourhood_mean(s4), size=(8, 12), mode="bilinear", align_corners=False)
    expected = torch.cat([neighbourhood_mean(s2), up], 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(feats.patches["mid"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.patches["4"], up.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-5)
    down = neighbourhood_mean(s1).reshape(2, 24, 8, 2, 12, 2).mean((3, 5))  # stride-4 stage: 2x2 block means
    torch.testing.assert_close(feats.patches["1"], down.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-5)
    pooled = effnet.model.forward_head(effnet.model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(feats.global_token, pooled, atol=1e-5, rtol=1e-5)


def test_random_config_and_bad_options() -> None:
    a = create_backbone("effnet-lite0", config={})
    assert a.identity.startswith("effnet-lite0@224:random-")
    with pytest.raises(ZsadError, match="multiple of 32"):
        create_backbone("effnet-lite0", config={}, image_size=100)
    with pytest.raises(ZsadError, match="unknown layer"):
        a.forward_features(torch.zeros(1, 3, 64, 64), ["nope"])
