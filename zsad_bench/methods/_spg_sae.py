"""SPG math: the bias-free TopK sparse autoencoder (Stage 1) and the guide-head pieces (Stage 2).

Map smoothing and the Dice loss are shared with other methods (``zsad_bench.postprocess``).

Everything here follows ``shared/spec/SPG.md`` (the official riips/SPG release); the plugin in
``spg.py`` wires it into a :class:`zsad_bench.detector.Detector`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DICT_EPS = 1e-8  # row normalisation of the dictionary
COS_EPS = 1e-8  # F.cosine_similarity's eps
FOCAL_SMOOTH = 1e-5  # FocalLoss smoothing of the one-hot target and of pt


def sparse_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values (clamped at >= 0) and indices of the ``k`` largest entries of ``pre`` per row (last axis)."""
    vals, idx = pre.topk(min(k, pre.shape[-1]), dim=-1)
    return vals.clamp(min=0), idx


def topk_codes(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest entries of ``pre`` per row (last axis), clamp them at >= 0, zero the rest."""
    vals, idx = sparse_topk(pre, k)
    return torch.zeros_like(pre).scatter(-1, idx, vals)


def decode_sparse(vals: torch.Tensor, idx: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """``sum_i vals[t, i] * atoms[idx[t, i]]`` for tokens ``t`` (= dense ``z @ atoms``, without the dense z)."""
    return F.embedding_bag(idx, atoms, per_sample_weights=vals, mode="sum")


class TopKSAE(nn.Module):
    """Bias-free TopK SAE: ``z = TopK_k(E x)``, ``x_hat = z D`` with ``D`` = unit-norm rows of ``D_raw``.

    Initialisation as the release: ``D_raw ~ N(0, 1)/sqrt(H)`` renormalised to unit rows, and the
    encoder tied to it (``E = D``), so initially ``a_j = <x, d_j>``.
    """

    def __init__(self, dim: int, width: int, k: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.dim, self.width, self.k = dim, width, k
        raw = torch.randn(width, dim, generator=generator) / math.sqrt(width)
        raw = raw / (raw.norm(dim=1, keepdim=True) + DICT_EPS)
        self.dictionary = nn.Parameter(raw.clone())
        self.encoder = nn.Parameter(raw.clone())

    def atoms(self) -> torch.Tensor:
        """The effective dictionary ``D`` ``(H, d)`` (rows of ``D_raw`` divided by their norm + 1e-8)."""
        return self.dictionary / (self.dictionary.norm(dim=1, keepdim=True) + DICT_EPS)

    def preactivations(self, x: torch.Tensor) -> torch.Tensor:
        """``a = E x`` for tokens ``x`` ``(..., d)`` -> ``(..., H)``."""
        return x @ self.encoder.t()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse codes ``z`` ``(..., H)`` with at most ``k`` non-zeros per token."""
        return topk_codes(self.preactivations(x), self.k)

    @torch.no_grad()
    def renormalise(self) -> None:
        """Unit-norm the raw dictionary rows in place (done after every optimiser step)."""
        self.dictionary.div_(self.dictionary.norm(dim=1, keepdim=True) + DICT_EPS)


class DeadLatentTracker:
    """Per-latent count of steps since it last fired (``z_j > threshold`` on any token of the batch).

    ``update`` applies ``s <- s * (1 - fired) + 1``; a latent is dead when ``s > max(1, floor(window / T))``
    with ``T`` the number of tokens of the current batch (the release's 10M-token window). Everything stays
    on the device (no host sync); :attr:`updates` (a host count) bounds every ``s``, so
    :meth:`may_have_dead` tells without a sync that no latent can be dead yet.
    """

    def __init__(
        self, width: int, window_tokens: int = 10_000_000, threshold: float = 1e-3, device: torch.device | None = None
    ) -> None:
        self.steps = torch.zeros(width, dtype=torch.long, device=device)
        self.window_tokens = window_tokens
        self.threshold = threshold
        self.updates = 0

    def limit(self, tokens: int) -> int:
        return max(1, self.window_tokens // tokens)

    def may_have_dead(self, tokens: int) -> bool:
        """False when no latent can be dead after this batch's update (``s <= updates + 1 <= limit``)."""
        return self.updates + 1 > self.limit(tokens)

    def update(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Record a batch's sparse codes (``sparse_topk`` output, ``(T, k)`` each); return the dead set."""
        hits = (vals.detach() > self.threshold).to(torch.int32).flatten()
        counts = torch.zeros(self.steps.shape, dtype=torch.int32, device=self.steps.device)
        fired = counts.index_add_(0, idx.flatten(), hits) > 0
        self.steps = self.steps * (~fired).long() + 1
        self.updates += 1
        return self.steps > self.limit(vals.shape[0])


def decode_dense(vals: torch.Tensor, idx: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """The same sum as :func:`decode_sparse` through a dense ``(T, H)`` code and one matmul.

    Faster on a GPU for wide supports (AuxK's 512 per token: one tensor-core matmul instead of a
    6.4 M-row gather and an atomic-add backward); slower on a CPU, where the sparse form is used.
    """
    dense = torch.zeros(vals.shape[0], atoms.shape[0], dtype=vals.dtype, device=vals.device)
    return dense.scatter(-1, idx, vals) @ atoms


def dense_auxk(device: torch.device) -> bool:
    """Whether the SAE fit decodes AuxK densely on ``device``: on CUDA (one matmul on the tensor cores;
    ``zsad_bench.bench.spg_fit_figures`` times both forms), not on a CPU (the sparse form is faster there
    and keeps CPU fits bitwise what they were)."""
    return device.type == "cuda"


def auxk_loss(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    pre: torch.Tensor,
    dead: torch.Tensor,
    atoms: torch.Tensor,
    k_aux: int,
    dense: bool = False,
) -> torch.Tensor:
    """AuxK loss of the release: reconstruct the residual from the ``k_aux`` largest *dead* pre-activations.

    Non-dead entries of ``pre`` are multiplied by 0 (not -inf, as the release), the top ``k_aux`` are
    clamped at >= 0, decoded through ``atoms`` (``dense``: :func:`decode_dense`), and compared with
    ``x - stopgrad(x_hat)`` by MSE (not normalised by the residual energy). Zero when no latent is dead
    (gated on the device: no host sync); NaN/inf become 0.
    """
    vals, idx = sparse_topk(pre * dead.to(pre.dtype), k_aux)
    residual = x - x_hat.detach()
    decoded = decode_dense(vals, idx, atoms) if dense else decode_sparse(vals, idx, atoms)
    loss = torch.nan_to_num((residual - decoded).pow(2).mean(), nan=0.0, posinf=0.0, neginf=0.0)
    return torch.where(dead.any(), loss, torch.zeros_like(loss))


def effective_coefficients(
    raw: torch.Tensor, alive: torch.Tensor, topk: int | None = None, straight_through: bool = True
) -> torch.Tensor:
    """Guide coefficients actually used: ``ReLU(C)`` with dead atoms zeroed, optionally TopK per row.

    With ``topk`` the ``topk`` largest entries of each row are kept (Appendix A). ``straight_through``
    (the release) passes the gradient to every entry (``c + stopgrad(hard - c)``); without it only the
    kept entries get a gradient (the paper's plain TopK).
    """
    c = F.relu(raw) * alive.to(raw.dtype)
    if topk is None:
        return c
    k = min(topk, c.shape[-1])
    idx = c.detach().topk(k, dim=-1).indices
    keep = torch.zeros_like(c).scatter(-1, idx, 1.0)
    hard = c * keep
    return c + (hard - c).detach() if straight_through else hard


def cosine_to_guides(tokens: torch.Tensor, guides: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of tokens ``(..., d)`` with guides ``(G, d)`` -> ``(..., G)`` (eps 1e-8 per norm)."""
    tn = tokens / tokens.norm(dim=-1, keepdim=True).clamp(min=COS_EPS)
    gn = guides / guides.norm(dim=-1, keepdim=True).clamp(min=COS_EPS)
    return tn @ gn.t()


def anomaly_probability(cos: torch.Tensor, tau: float) -> torch.Tensor:
    """Channel 1 of ``softmax(cos / tau)`` over the two guides (normal, anomaly): ``(..., 2) -> (...)``."""
    return torch.softmax(cos / tau, dim=-1)[..., 1]


def interpolation_matrix(n: int, size: int, device: torch.device | None = None) -> torch.Tensor:
    """``(size, n)`` matrix of 1-D linear interpolation with ``align_corners=False`` (half-pixel centres)."""
    eye = torch.eye(n, device=device).unsqueeze(1)
    return F.interpolate(eye, size=size, mode="linear", align_corners=False).squeeze(1).t()


def upsample_map(prob: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (``align_corners=False``) upsampling of patch maps ``(B, h, w)`` to ``(B, size, size)``.

    Bilinear interpolation is separable, so it is computed as ``U_h P U_w^T``: the same numbers as
    ``F.interpolate`` (to float rounding) with a much cheaper backward pass on CPU.
    """
    rows = interpolation_matrix(prob.shape[-2], size, prob.device).to(prob.dtype)
    cols = interpolation_matrix(prob.shape[-1], size, prob.device).to(prob.dtype)
    return rows @ prob @ cols.t()


def focal_loss(p_anom: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """The release's FocalLoss on 2-class probabilities (no alpha, smoothing 1e-5), mean over pixels.

    For a pixel with label y: one-hot clamped to [1e-5, 1 - 1e-5], ``pt = sum_c onehot_c p_c + 1e-5``,
    loss ``-(1 - pt)^gamma log pt``.
    """
    y = target.to(p_anom.dtype)
    hi, lo = 1.0 - FOCAL_SMOOTH, FOCAL_SMOOTH
    w_anom = y * hi + (1 - y) * lo
    pt = w_anom * p_anom + (1 - w_anom) * (1 - p_anom) + FOCAL_SMOOTH
    return (-((1 - pt) ** gamma) * pt.log()).mean()


class EMA:
    """Exponential moving average of a tensor; the first update copies it (AveragedModel, warm-up 0)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.value: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, current: torch.Tensor) -> None:
        if self.value is None:
            self.value = current.detach().clone()
        else:
            self.value.mul_(self.decay).add_(current.detach(), alpha=1 - self.decay)


def aggregate_scores(maps: torch.Tensor, method: str = "max", tau: float = 1.0) -> torch.Tensor:
    """Image scores from maps ``(B, S, S)``: ``max``, ``mean`` or ``lse``.

    ``lse`` is the release's log-*mean*-exp with temperature ``tau``:
    ``m + tau * log(mean exp((A - m) / tau))`` (tau clamped >= 1e-8, the mean >= 1e-10), which tends to
    the max as tau -> 0 and to the mean as tau -> inf.
    """
    flat = maps.flatten(1)
    if method == "max":
        return flat.amax(1)
    if method == "mean":
        return flat.mean(1)
    if method == "lse":
        t = max(float(tau), 1e-8)
        wide = flat.double()  # float32 loses the mean limit at large tau
        m = wide.amax(1, keepdim=True)
        inner = torch.exp((wide - m) / t).mean(1, keepdim=True).clamp(min=1e-10)
        return (m + t * inner.log()).squeeze(1).to(maps.dtype)
    raise ValueError(f"unknown aggregation {method!r}")
