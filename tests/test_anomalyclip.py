"""AnomalyCLIP: DPAM attention, learned-prompt text encoding, similarity maps, losses, fit/predict smoke."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from tests.test_winclip import image_source, run_tiny_synthetic, tiny_clip
from zsad_bench.detector import FitContext, create_method, list_methods
from zsad_bench.errors import ZsadError
from zsad_bench.methods.anomalyclip import (
    dpam_forward,
    encode_learned_text,
    focal_loss,
    similarity_map,
)
from zsad_bench.postprocess import dice_loss


def _heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Slow per-image, per-head softmax(q k^T / sqrt(d)) v."""
    b, _n, c = q.shape
    d = c // heads
    out = torch.zeros_like(q)
    for i in range(b):
        for h in range(heads):
            s = slice(h * d, (h + 1) * d)
            a = torch.softmax(q[i, :, s] @ k[i, :, s].T / math.sqrt(d), dim=-1)
            out[i, :, s] = a @ v[i, :, s]
    return out


def test_attention_branches_against_torch_mha_and_loop():
    bb = tiny_clip()
    block = bb.model.visual.transformer.resblocks[0]
    mha = block.attn
    x = torch.randn(2, 5, 64)
    original, vv = bb.tower.attention_branches(1, x)
    h = block.ln_1(x)
    torch.testing.assert_close(original, mha(h, h, h, need_weights=False)[0], atol=1e-5, rtol=1e-5)
    _q, _k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    expected = mha.out_proj(_heads_attention(v, v, v, mha.num_heads))
    torch.testing.assert_close(vv, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bb.tower.run_block(1, x), x + original + bb.tower.mlp_branch(1, x + original))


def test_dpam_forward_without_dpam_is_plain_clip():
    bb = tiny_clip()
    visual = bb.model.visual
    x = torch.randn(2, 3, 56, 56)
    image, (patches,) = dpam_forward(bb.tower, x, (2,), dpam_start=3)
    visual.output_tokens = True
    _, tokens = visual(x)
    torch.testing.assert_close(patches, tokens @ visual.proj, atol=1e-5, rtol=1e-5)
    assert image.shape == (2, 16)


def test_dpam_forward_matches_slow_dual_path():
    """Blocks >= start: the DPAM path adds v-v attention of the original path's ln_1 tokens and skips the MLP."""
    bb = tiny_clip(seed=3)
    visual = bb.model.visual
    images = torch.randn(2, 3, 56, 56)
    image, (p1, p2) = dpam_forward(bb.tower, images, (1, 2), dpam_start=2)
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], 1) + visual.positional_embedding
    x = visual.ln_pre(x)
    b1, b2 = visual.transformer.resblocks
    h = b1.ln_1(x)
    x = x + b1.attn(h, h, h, need_weights=False)[0]
    x = x + b1.mlp(b1.ln_2(x))
    ref1 = visual.ln_post(x[:, 1:]) @ visual.proj
    h = b2.ln_1(x)
    _q, _k, v = F.linear(h, b2.attn.in_proj_weight, b2.attn.in_proj_bias).chunk(3, dim=-1)
    dpam = x + b2.attn.out_proj(_heads_attention(v, v, v, b2.attn.num_heads))
    ori = x + b2.attn(h, h, h, need_weights=False)[0]
    ori = ori + b2.mlp(b2.ln_2(ori))
    torch.testing.assert_close(p1, ref1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p2, visual.ln_post(dpam[:, 1:]) @ visual.proj, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image, ori[:, 0] @ visual.proj, atol=1e-5, rtol=1e-5)


def test_learned_text_equals_clip_text_for_word_contexts():
    """Contexts set to the embeddings of real words and no deep prompts: CLIP's own text encoding."""
    bb = tiny_clip()
    det = create_method("anomalyclip", bb, n_ctx=3, depth=1, deep_len=1)
    words = bb.model.token_embedding(bb.text.tokenize(["red green blue"]))[0, 1:4]
    with torch.no_grad():
        det.prompts.ctx_normal.copy_(words)
        det.prompts.ctx_anomalous.copy_(words)
    ref = bb.model.encode_text(open_clip.tokenize(["red green blue object.", "red green blue damaged object."]))
    torch.testing.assert_close(encode_learned_text(bb.text, det.prompts), ref, atol=1e-5, rtol=1e-5)


def test_learned_text_deep_prompts_replace_tokens_before_deeper_blocks():
    bb = tiny_clip()
    det = create_method("anomalyclip", bb, n_ctx=4, depth=2, deep_len=2)
    learner = det.prompts
    deep = learner.deep[0]

    def swap(_module, args, kwargs):
        x = args[0].clone()
        x[:, 1:3] = deep
        return (x, *args[1:]), kwargs

    handle = bb.model.transformer.resblocks[1].register_forward_pre_hook(swap, with_kwargs=True)
    try:
        # with a hook doing the swap, CLIP's own encode_text on the prompt embeddings is the reference
        x = learner() + bb.model.positional_embedding
        x = bb.model.transformer(x, attn_mask=bb.model.attn_mask)
        x = bb.model.ln_final(x)
        ref = x[torch.arange(2), learner.tokens.argmax(-1)] @ bb.model.text_projection
    finally:
        handle.remove()
    torch.testing.assert_close(encode_learned_text(bb.text, learner), ref, atol=1e-5, rtol=1e-5)


def test_similarity_map_hand_case():
    patches = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.0]]])  # 2x2 grid
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = similarity_map(patches, text, size=2, temperature=1.0)
    cos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2**-0.5, 2**-0.5], [-1.0, 0.0]])
    anomalous = torch.exp(cos[:, 1]) / torch.exp(cos).sum(1)
    torch.testing.assert_close(out[0, 1], anomalous.reshape(2, 2))
    torch.testing.assert_close(out[0, 0] + out[0, 1], torch.ones(2, 2))


def test_focal_and_dice_hand_cases():
    probs = torch.tensor([0.8, 0.3]).reshape(1, 1, 1, 2)
    probs = torch.cat([probs, 1 - probs], dim=1)  # (1, 2, 1, 2): p(normal), p(anomalous)
    target = torch.tensor([[[0.0, 1.0]]])
    s = 1e-5
    pt = torch.tensor([(1 - s) * 0.8 + s * 0.2 + s, (1 - s) * 0.7 + s * 0.3 + s])
    expected = (-((1 - pt) ** 2) * pt.log()).mean()
    torch.testing.assert_close(focal_loss(probs, target), expected)
    pred = torch.tensor([[[1.0, 1.0], [0.5, 0.0]]])
    tgt = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    # intersection 1.5, sums 2.5 and 2: 1 - (3 + 1) / (4.5 + 1)
    torch.testing.assert_close(dice_loss(pred, tgt), torch.tensor(1 - 4 / 5.5))


def test_invalid_options_raise():
    with pytest.raises(ZsadError, match="layers"):
        create_method("anomalyclip", tiny_clip(), depth=2, layers=(5,))
    with pytest.raises(ZsadError, match="depth"):
        create_method("anomalyclip", tiny_clip(), depth=9)


@pytest.mark.slow
def test_fit_predict_smoke_trains_only_prompts():
    bb = tiny_clip()
    clip_before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    det = create_method("anomalyclip", bb, epochs=1, n_ctx=4, depth=2, deep_len=2, dpam_layers=1, sigma=1.0)
    source = image_source(6)
    ctx = FitContext(torch.device("cpu"), seed=5, progress=False)
    det.fit(source, ctx)
    after = det.state_dict()
    torch.manual_seed(5)
    init = {k: v.detach() for k, v in det.new_prompts().named_parameters()}
    assert any(not torch.equal(init[k], after[k]) for k in after)
    det.fit(source, ctx)  # refitting restarts from the seeded initialisation: same result
    for k, v in det.state_dict().items():
        torch.testing.assert_close(v, after[k], rtol=0, atol=0)
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, clip_before[k]), k
    batch = next(source.batches(6))
    pred = det.predict(batch)
    assert pred.maps.shape == (6, 56, 56) and pred.scores.shape == (6,)
    assert ((pred.scores > 0) & (pred.scores < 1)).all()

    fresh = create_method("anomalyclip", tiny_clip(), epochs=1, n_ctx=4, depth=2, deep_len=2, dpam_layers=1, sigma=1.0)
    fresh.load_state_dict(after)
    again = fresh.predict(batch)
    torch.testing.assert_close(again.maps, pred.maps)
    torch.testing.assert_close(again.scores, pred.scores)
    assert "anomalyclip" in list_methods(learning_type="zero-shot")


@pytest.mark.slow
def test_end_to_end_synthetic(tmp_path):
    result = run_tiny_synthetic("anomalyclip", "openclip", tmp_path / "r.json", epochs=1, depth=2)
    (record,) = result.records
    assert record.category == "cap" and record.n_images == 25
    assert all(0.0 <= record.metrics[m] <= 1.0 for m in ("image_auroc", "pixel_auroc", "aupro"))
    assert any(k.startswith("checkpoint|") for k in result.artifacts)
