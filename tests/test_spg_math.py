"""SPG math against hand-computed cases and independent references (numpy loops, scipy, torch built-ins)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from zsad_bench.methods._spg_sae import (
    EMA,
    DeadLatentTracker,
    TopKSAE,
    aggregate_scores,
    anomaly_probability,
    auxk_loss,
    cosine_to_guides,
    decode_sparse,
    effective_coefficients,
    focal_loss,
    sparse_topk,
    topk_codes,
    upsample_map,
)
from zsad_bench.postprocess import dice_loss, gaussian_kernel1d, gaussian_smooth


def test_topk_hand_case_and_negative_clamp() -> None:
    pre = torch.tensor([[3.0, -1.0, 5.0, 2.0], [-1.0, -2.0, -3.0, 0.5]])
    z = topk_codes(pre, 2)
    assert z.tolist() == [[3.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 0.5]]


def test_topk_keeps_exactly_k_per_token() -> None:
    pre = torch.rand(50, 64, generator=torch.Generator().manual_seed(0)) + 0.01
    z = topk_codes(pre, 7)
    assert ((z != 0).sum(1) == 7).all()
    # the kept entries are the 7 largest: every kept value >= every dropped value, per row
    for row_pre, row_z in zip(pre, z, strict=True):
        kept = row_pre[row_z != 0]
        dropped = row_pre[row_z == 0]
        assert kept.min() >= dropped.max()
        assert torch.equal(row_z[row_z != 0], kept)


def test_sae_init_tied_unit_rows_and_encode_decode() -> None:
    sae = TopKSAE(dim=6, width=10, k=3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(sae.dictionary.norm(dim=1), torch.ones(10), atol=1e-6)
    assert torch.equal(sae.encoder, sae.dictionary)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    d = sae.dictionary.detach().numpy().astype(np.float64)
    z = sae.encode(x).detach().numpy()
    vals, idx = sparse_topk(sae.preactivations(x), 3)
    x_hat = decode_sparse(vals, idx, sae.atoms()).detach().numpy()
    for t in range(4):
        a = d @ x[t].numpy()  # tied init: a_j = <x, d_j>
        top = np.argsort(-a)[:3]
        expect = np.zeros(10)
        expect[top] = np.maximum(a[top], 0)
        np.testing.assert_allclose(z[t], expect, atol=1e-5)
        np.testing.assert_allclose(x_hat[t], sum(expect[j] * d[j] for j in range(10)), atol=1e-5)


def test_renormalise_restores_unit_rows() -> None:
    sae = TopKSAE(dim=5, width=8, k=2)
    with torch.no_grad():
        sae.dictionary.mul_(torch.arange(1, 9, dtype=torch.float32).view(8, 1))
    sae.renormalise()
    assert torch.allclose(sae.dictionary.norm(dim=1), torch.ones(8), atol=1e-6)


def _sparse(z: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return sparse_topk(z, k)


def test_dead_tracker_hand_sequence() -> None:
    # 2 tokens per batch, window 4 tokens -> dead after more than 2 steps without firing
    tracker = DeadLatentTracker(width=3, window_tokens=4, threshold=1e-3)
    fires_0 = torch.tensor([[1.0, 0.0, 5e-4], [0.0, 0.0, 0.0]])  # latent 2 below the firing threshold
    assert tracker.update(*_sparse(fires_0)).tolist() == [False, False, False]  # steps 1, 1, 1
    assert tracker.update(*_sparse(fires_0)).tolist() == [False, False, False]  # steps 1, 2, 2
    assert tracker.update(*_sparse(fires_0)).tolist() == [False, True, True]  # steps 1, 3, 3
    revive_1 = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    assert tracker.update(*_sparse(revive_1)).tolist() == [False, False, True]  # steps 2, 1, 4
    assert tracker.steps.tolist() == [2, 1, 4]
    # a large batch (10 tokens) lowers the limit to max(1, 4 // 10) = 1
    assert tracker.update(*_sparse(torch.zeros(10, 3))).tolist() == [True, True, True]


def test_sparse_decode_equals_dense_with_gradients() -> None:
    gen = torch.Generator().manual_seed(7)
    pre = torch.randn(6, 12, generator=gen, requires_grad=True)
    atoms = torch.randn(12, 5, generator=gen, requires_grad=True)
    vals, idx = sparse_topk(pre, 4)
    sparse = decode_sparse(vals, idx, atoms)
    dense = topk_codes(pre, 4) @ atoms
    assert torch.allclose(sparse, dense, atol=1e-6)
    w = torch.randn(6, 5, generator=gen)
    g_sparse = torch.autograd.grad((sparse * w).sum(), (pre, atoms))
    g_dense = torch.autograd.grad((dense * w).sum(), (pre, atoms))
    for a, b in zip(g_sparse, g_dense, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_auxk_loss_value_and_gradient_only_on_dead_latents() -> None:
    gen = torch.Generator().manual_seed(3)
    atoms = F.normalize(torch.randn(6, 4, generator=gen), dim=1)
    x = torch.randn(5, 4, generator=gen)
    pre = torch.randn(5, 6, generator=gen, requires_grad=True)
    x_hat = torch.randn(5, 4, generator=gen, requires_grad=True)
    dead = torch.tensor([False, True, False, True, True, False])
    loss = auxk_loss(x, x_hat, pre, dead, atoms, k_aux=2)
    # slow reference: per token, the 2 largest dead pre-activations, clamped, decode the residual
    p, xh, a = pre.detach().numpy(), x_hat.detach().numpy(), atoms.numpy()
    total = 0.0
    for t in range(5):
        cand = sorted(((p[t, j], j) for j in range(6) if dead[j]), reverse=True)[:2]
        recon = sum(max(v, 0.0) * a[j] for v, j in cand)
        total += ((x[t].numpy() - xh[t] - recon) ** 2).sum()
    assert float(loss.detach()) == pytest.approx(total / (5 * 4), rel=1e-5)
    loss.backward()
    assert (pre.grad[:, ~dead] == 0).all()
    assert (pre.grad[:, dead] != 0).any()
    assert x_hat.grad is None  # the residual target is stop-gradient


def test_auxk_loss_zero_without_dead_latents() -> None:
    x = torch.randn(3, 4)
    loss = auxk_loss(x, torch.zeros(3, 4), torch.randn(3, 6), torch.zeros(6, dtype=torch.bool), torch.eye(6, 4), 2)
    assert float(loss) == 0.0


def test_guides_non_negative_dead_masked_and_decode_to_dt_c() -> None:
    gen = torch.Generator().manual_seed(4)
    raw = torch.randn(4, 8, generator=gen)
    alive = torch.tensor([True, True, False, True, True, True, False, True])
    c = effective_coefficients(raw, alive)
    assert (c >= 0).all()
    assert (c[:, ~alive] == 0).all()
    expect = raw.clamp(min=0) * alive
    assert torch.equal(c, expect)
    atoms = torch.randn(8, 3, generator=gen)
    guides = c @ atoms
    for r in range(4):
        by_hand = sum(float(c[r, j]) * atoms[j] for j in range(8))
        assert torch.allclose(guides[r], by_hand, atol=1e-6)


def test_topk_guides_straight_through_and_plain() -> None:
    raw = torch.tensor([[0.5, -0.2, 0.9, 0.1, 0.7], [0.3, 0.8, 0.2, 0.6, -1.0]], requires_grad=True)
    alive = torch.tensor([True, True, True, True, False])
    weights = torch.arange(1.0, 11.0).view(2, 5)
    c = effective_coefficients(raw, alive, topk=2, straight_through=True)
    assert torch.allclose(c.detach(), torch.tensor([[0.5, 0, 0.9, 0, 0], [0, 0.8, 0, 0.6, 0]]), atol=0)
    (c * weights).sum().backward()
    # straight-through: d/draw = weight * ReLU'(raw) * alive for every entry, selected or not
    expect = weights * (raw.detach() > 0) * alive
    assert torch.equal(raw.grad, expect)
    raw.grad = None
    c = effective_coefficients(raw, alive, topk=2, straight_through=False)
    (c * weights).sum().backward()
    kept = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 0, 1, 0]])
    assert torch.equal(raw.grad, weights * kept)


def test_cosine_softmax_matches_reference() -> None:
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randn(2, 7, 6, generator=gen)
    guides = torch.randn(2, 6, generator=gen)
    cos = cosine_to_guides(tokens, guides)
    ref = F.cosine_similarity(tokens.unsqueeze(2), guides.view(1, 1, 2, 6), dim=-1)
    assert torch.allclose(cos, ref, atol=1e-6)
    p = anomaly_probability(cos, 0.07)
    by_hand = 1 / (1 + torch.exp(-(ref[..., 1] - ref[..., 0]) / 0.07))
    assert torch.allclose(p, by_hand, atol=1e-6)


def test_cosine_with_zero_guide_is_zero() -> None:
    cos = cosine_to_guides(torch.ones(3, 4), torch.zeros(2, 4))
    assert torch.equal(cos, torch.zeros(3, 2))
    assert torch.allclose(anomaly_probability(cos, 0.07), torch.full((3,), 0.5))


def _bilinear_reference(img: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize, one output pixel at a time."""
    h, w = img.shape
    out = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            sy = max((i + 0.5) * h / size - 0.5, 0.0)
            sx = max((j + 0.5) * w / size - 0.5, 0.0)
            y0, x0 = min(int(sy), h - 1), min(int(sx), w - 1)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = sy - y0, sx - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_upsample_hand_case_and_reference() -> None:
    up = upsample_map(torch.tensor([[[0.0, 1.0], [2.0, 3.0]]]), 4)
    assert up[0, 0].tolist() == [0.0, 0.25, 0.75, 1.0]
    assert up[0, :, 0].tolist() == [0.0, 0.5, 1.5, 2.0]
    img = np.random.default_rng(6).random((3, 3))
    ref = _bilinear_reference(img, 8)
    np.testing.assert_allclose(upsample_map(torch.tensor(img)[None].float(), 8)[0].numpy(), ref, atol=1e-6)
    maps = torch.rand(2, 5, 7)
    ref = torch.nn.functional.interpolate(maps[:, None], size=(12, 12), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(upsample_map(maps, 12), ref, atol=1e-6)


def test_focal_loss_direct_formula() -> None:
    p = torch.tensor([[[0.9, 0.2], [0.6, 0.01]]])
    y = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    total = 0.0
    for pa, lab in zip(p.flatten().tolist(), y.flatten().tolist(), strict=True):
        onehot = [1e-5, 1 - 1e-5] if lab else [1 - 1e-5, 1e-5]
        pt = onehot[0] * (1 - pa) + onehot[1] * pa + 1e-5
        total += -((1 - pt) ** 2) * math.log(pt)
    assert float(focal_loss(p, y, 2.0)) == pytest.approx(total / 4, rel=1e-6)


def test_dice_loss_direct_formula() -> None:
    p = torch.tensor([[[0.5, 1.0], [0.0, 0.25]], [[0.2, 0.2], [0.2, 0.2]]])
    y = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    d0 = (2 * 1.5 + 1) / (1.75 + 2 + 1)
    d1 = 1 / (0.8 + 0 + 1)
    assert float(dice_loss(p, y)) == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)


def test_ema_first_update_copies_then_decays() -> None:
    ema = EMA(0.999)
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0])
    ema.update(a)
    assert torch.equal(ema.value, a)
    a.add_(100)  # the EMA holds a copy
    ema.update(b)
    assert torch.allclose(ema.value, torch.tensor([0.999 * 1 + 0.001 * 3, 0.999 * -2 + 0.001 * 4]))


def test_gaussian_kernel_matches_scipy_impulse() -> None:
    impulse = np.zeros(41)
    impulse[20] = 1.0
    ref = gaussian_filter(impulse, sigma=4.0, mode="reflect", truncate=4.0)[4:37]
    np.testing.assert_allclose(gaussian_kernel1d(4.0).numpy(), ref, atol=1e-12)


@pytest.mark.parametrize(("size", "sigma"), [(40, 4.0), (10, 4.0), (7, 1.5)])
def test_gaussian_smooth_equals_scipy_per_image(size: int, sigma: float) -> None:
    maps = np.random.default_rng(size).random((3, size, size)).astype(np.float32)
    out = gaussian_smooth(torch.from_numpy(maps), sigma).numpy()
    for b in range(3):  # each image on its own (the release also smoothed across the batch axis)
        ref = gaussian_filter(maps[b].astype(np.float64), sigma=sigma, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(out[b], ref, atol=1e-5)


def test_gaussian_smooth_sigma_zero_is_identity() -> None:
    maps = torch.rand(2, 5, 5)
    assert torch.equal(gaussian_smooth(maps, 0.0), maps)


def test_aggregation_max_mean_lse() -> None:
    maps = torch.tensor([[[0.1, 0.9], [0.3, 0.5]], [[0.2, 0.2], [0.2, 0.2]]])
    assert aggregate_scores(maps, "max").tolist() == pytest.approx([0.9, 0.2])
    assert aggregate_scores(maps, "mean").tolist() == pytest.approx([0.45, 0.2])
    vals, tau = [0.1, 0.9, 0.3, 0.5], 0.1
    lme = tau * math.log(sum(math.exp(v / tau) for v in vals) / 4)  # log-MEAN-exp
    assert float(aggregate_scores(maps, "lse", tau)[0]) == pytest.approx(lme, rel=1e-6)
    assert float(aggregate_scores(maps, "lse", 1e-4)[0]) == pytest.approx(0.9, abs=1e-3)
    assert float(aggregate_scores(maps, "lse", 1e4)[0]) == pytest.approx(0.45, abs=1e-4)
    assert float(aggregate_scores(maps, "lse", 0.5)[1]) == pytest.approx(0.2, abs=1e-6)
    with pytest.raises(ValueError):
        aggregate_scores(maps, "median")
