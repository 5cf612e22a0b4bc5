"""VisualAD: token insertion, frozen-backbone gradients, map/score math, SCA, fit/predict on CLIP and DINOv2."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_winclip import _NoText, image_source, run_tiny_synthetic, tiny_clip
from zsad_bench.backbones import create_backbone
from zsad_bench.backbones.base import Backbone
from zsad_bench.backbones.testing import tiny_config
from zsad_bench.detector import FitContext, create_method, get_method_class, list_methods
from zsad_bench.errors import ZsadError
from zsad_bench.methods.visualad import SpatialCrossAttention, token_map, topk_mean


def tiny_dino() -> Backbone:
    """The ``dinov2`` backbone on a tiny random DINOv2 (width 32, 2 blocks) at 56 px: 4x4 patches."""
    torch.manual_seed(0)
    return create_backbone("dinov2", config=tiny_config("dinov2"), image_size=56)


def test_token_insertion_matches_open_clip_transformer_on_extended_sequence():
    bb = tiny_clip()
    det = create_method("visualad", bb, layers=(2,))
    head = det.head
    visual = bb.model.visual
    images = torch.randn(2, 3, 56, 56)
    anomaly, normal, (patches,) = det.encode(images)
    assert anomaly.shape == normal.shape == (2, 64) and patches.shape == (2, 16, 64)
    # reference: one sequence [anomaly, normal, CLS, patches] with positions, through open_clip's own transformer;
    # the two tokens' position is the pretrained CLS one (official build_model.py:50-53)
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], 1) + visual.positional_embedding
    extra = torch.stack([head.anomaly_token, head.normal_token]) + visual.positional_embedding[0]
    x = visual.ln_pre(torch.cat([extra.expand(2, -1, -1), x], 1))
    out = visual.transformer(x)
    torch.testing.assert_close(patches, visual.ln_post(out[:, 3:]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(anomaly, visual.ln_post(out[:, 0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normal, visual.ln_post(out[:, 1]), atol=1e-5, rtol=1e-5)
    # the tokens attend: CLIP's patch tokens without them differ
    visual.output_tokens = True
    _, plain = visual(images)
    assert not torch.allclose(plain, patches, atol=1e-4)


def test_token_insertion_on_dinov2_matches_hf_encoder():
    bb = tiny_dino()
    det = create_method("visualad", bb, layers=(1, 2))
    head = det.head
    images = torch.randn(2, 3, 56, 56)
    anomaly, _, (p1, p2) = det.encode(images)
    x = bb.model.embeddings(images)
    cls_pos = bb.model.embeddings.position_embeddings[0, 0]  # the CLS position embedding (frozen)
    x = torch.cat([(torch.stack([head.anomaly_token, head.normal_token]) + cls_pos).expand(2, -1, -1), x], 1)
    h1 = bb.model.encoder.layer[0](x)
    h2 = bb.model.encoder.layer[1](h1)
    torch.testing.assert_close(p1, bb.model.layernorm(h1[:, 3:]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p2, bb.model.layernorm(h2[:, 3:]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(anomaly, bb.model.layernorm(h2[:, 0]), atol=1e-5, rtol=1e-5)


def test_loss_backward_reaches_tokens_not_the_frozen_vit():
    bb = tiny_clip()
    det = create_method("visualad", bb, layers=(1, 2))
    det.head.train()
    batch = next(image_source(4).batches(4, masks=True))
    det.loss(batch).backward()
    assert all(p.grad is None for p in bb.parameters())
    assert det.head.anomaly_token.grad is not None and det.head.anomaly_token.grad.abs().sum() > 0
    assert det.head.normal_token.grad is not None and det.head.norm.weight.grad is not None
    # the tokens' positions are the backbone's frozen CLS one: nothing of their own, learned or buffered
    assert {n for n, _ in det.head.named_parameters() if "." not in n} == {"anomaly_token", "normal_token"}
    assert {n for n, _ in det.head.named_buffers() if "." not in n} == set()


def test_token_map_hand_case():
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-2.0, 0.0]]])  # 2x2 grid
    anomaly = torch.tensor([[0.0, 3.0]])
    normal = torch.tensor([[2.0, 0.0]])
    out = token_map(patches, anomaly, normal, size=2)
    torch.testing.assert_close(out[0], torch.tensor([[-1.0, 1.0], [0.0, 1.0]]))


def test_topk_mean_hand_case():
    maps = torch.arange(200.0).reshape(2, 10, 10)
    torch.testing.assert_close(topk_mean(maps, 0.01), torch.tensor([99.0, 199.0]))
    torch.testing.assert_close(topk_mean(maps, 0.03), torch.tensor([98.0, 198.0]))  # ceil(3) = 3: mean of 97..99
    torch.testing.assert_close(topk_mean(maps, 0.001), torch.tensor([99.0, 199.0]))  # at least one pixel


def test_spatial_cross_attention_against_loop():
    torch.manual_seed(1)
    sca = SpatialCrossAttention(8, anchors=3, dropout=0.0, max_patches=10, res_scale=0.5).eval()
    proto, patches = torch.randn(2, 8), torch.randn(2, 5, 8)
    out = sca(proto, patches)
    expected = torch.zeros(2, 8)
    for b in range(2):
        gated = torch.zeros(8)
        for a in range(3):
            q = sca.q_norm(sca.q(sca.anchors[a]))
            logits = torch.stack(
                [q @ sca.k_norm(sca.k(patches[b, j] + sca.pos[0, j])) / math.sqrt(8) for j in range(5)]
            )
            w = torch.exp(logits) / torch.exp(logits).sum()
            agg = sum(w[j] * sca.v(patches[b, j]) for j in range(5))
            gated = gated + torch.sigmoid(sca.gate(proto[b]))[a] * agg
        expected[b] = proto[b] + 0.5 * sca.out(gated)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ZsadError, match="patch tokens"):
        sca(proto, torch.randn(2, 11, 8))


def test_backbone_restrictions():
    assert "visualad" in list_methods(learning_type="zero-shot")
    with pytest.raises(ZsadError, match="openclip or dinov2"):
        create_method("visualad", _NoText())
    from zsad_bench.backbones import check_method_backbone
    from zsad_bench.detector import get_method_class

    cls = get_method_class("visualad")
    for name in ("openclip", "openclip-vitb16plus", "dinov2", "dinov2-vits14", "dinov2-vitb14"):
        check_method_backbone(cls, name)
    for name in ("dinov3", "siglip", "effnet-lite0"):
        with pytest.raises(
            ZsadError, match=r"does not run on backbone .*; use --backbone openclip or dinov2 or openclip-vitb16plus or"
        ):
            check_method_backbone(cls, name)


def test_per_dataset_epochs_follow_the_official_script():
    """scripts/CLIP.sh: MVTec -> VisA trains 2 epochs, VisA -> MVTec 1 (keyed by the target)."""
    cls = get_method_class("visualad")
    assert cls.dataset_defaults["visa"] == {"epochs": 2} and cls.dataset_defaults["mvtec"] == {"epochs": 1}
    assert cls.Config().epochs == 1
    with pytest.raises(ZsadError, match="layers"):
        create_method("visualad", tiny_clip())  # default layers 6..24 do not exist in a 2-block ViT


@pytest.mark.slow
@pytest.mark.parametrize("make", [tiny_clip, tiny_dino])
def test_fit_predict_smoke_and_checkpoint_round_trip(make):
    bb = make()
    backbone_before = {k: v.clone() for k, v in bb.state_dict().items()}
    det = create_method("visualad", bb, layers=(1, 2), epochs=1, sigma=1.0)
    source = image_source()
    ctx = FitContext(torch.device("cpu"), seed=3, progress=False)
    det.fit(source, ctx)
    after = det.state_dict()
    torch.manual_seed(3)
    init = det.new_head().state_dict()
    assert not torch.equal(init["anomaly_token"], after["anomaly_token"])
    det.fit(source, ctx)  # refitting restarts from the seeded initialisation: same result
    for k, v in det.state_dict().items():
        torch.testing.assert_close(v, after[k], rtol=0, atol=0)
    for k, v in bb.state_dict().items():
        assert torch.equal(v, backbone_before[k]), k
    batch = next(source.batches(6))
    pred = det.predict(batch)
    assert pred.maps.shape == (6, 56, 56) and pred.scores.shape == (6,)
    # image score = mean of the top 1% (ceil(31.36) = 32 pixels) of the smoothed map
    torch.testing.assert_close(pred.scores, pred.maps.flatten(1).sort(1, descending=True).values[:, :32].mean(1))

    fresh = create_method("visualad", make(), layers=(1, 2), epochs=1, sigma=1.0)
    fresh.load_state_dict(after)
    again = fresh.predict(batch)
    torch.testing.assert_close(again.maps, pred.maps)
    torch.testing.assert_close(again.scores, pred.scores)
    with pytest.raises(ZsadError, match="refit"):
        fresh.load_state_dict({k: v for k, v in after.items() if k != "normal_token"})


@pytest.mark.slow
def test_end_to_end_synthetic(tmp_path):
    result = run_tiny_synthetic("visualad", "dinov2", tmp_path / "r.json", epochs=1, layers=(1, 2))
    (record,) = result.records
    assert record.category == "cap" and record.n_images == 25
    assert all(0.0 <= record.metrics[m] <= 1.0 for m in ("image_auroc", "pixel_auroc", "aupro"))
