"""SPG — Sparse-Projected Guides (arXiv 2604.02871), plugins ``spg`` and ``spg-topk``.

Stage 1 trains a bias-free TopK SAE on the auxiliary set's patch tokens (from the feature cache);
Stage 2 freezes it and learns non-negative guide coefficients ``C`` (4 x H) whose decoding through
the SAE dictionary gives normal/anomaly guide vectors; patches are scored by a 2-way cosine softmax.
Defaults follow the official release (``shared/spec/SPG.md``); where the paper differs, its form is
a Config option (see :class:`SPG.Config`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from zsad_bench.backbones.base import Features
from zsad_bench.data import samples_fingerprint
from zsad_bench.detector import Batch, DataSource, Detector, FitContext, LearningType, Prediction, register_method
from zsad_bench.errors import ZsadError
from zsad_bench.features import precision_context
from zsad_bench.methods._spg_sae import (
    EMA,
    DeadLatentTracker,
    TopKSAE,
    aggregate_scores,
    anomaly_probability,
    auxk_loss,
    cosine_to_guides,
    decode_dense,
    decode_sparse,
    dense_auxk,
    effective_coefficients,
    focal_loss,
    sparse_topk,
    upsample_map,
)
from zsad_bench.options import check_option
from zsad_bench.postprocess import dice_loss, gaussian_smooth
from zsad_bench.results import atomic_write_bytes
from zsad_bench.source import FeatureSource

STATE_FORMAT = "spg/v1"
RESIDENT_FRACTION = 0.5  # aux tokens live on the GPU when they take at most this share of its free memory
AGGREGATIONS = ("max", "mean", "lse")


def _opt(
    default: Any,
    help: str,
    choices: tuple[str, ...] | None = None,
    inference: bool = False,
    pair: bool = False,
    **bounds: float,
) -> Any:
    """A Config field with the option metadata of ``zsad_bench.detector`` (help, bounds, choices,
    ``inference``: only predict() reads it, so changing it reuses a fitted checkpoint). ``pair``: a pair
    of numbers in [0, 1) (Adam betas)."""
    meta: dict[str, Any] = {"help": help, **bounds}
    if choices is not None:
        meta["choices"] = choices
    if inference:
        meta["inference"] = True
    if pair:
        meta.update(ge=0, lt=1, length=2)
    return field(default=default, metadata=meta)


def _report_epoch(epoch: int, total: int) -> bool:
    """Log the first, every 10th and the last epoch (the progress bar shows the rest)."""
    return epoch == 0 or epoch + 1 == total or (epoch + 1) % 10 == 0


def _tokens(features: Features, device: torch.device) -> tuple[torch.Tensor, int, int, torch.Tensor | None]:
    """Patch tokens ``(B, N, d)`` (row-major), grid ``h, w`` and the global token ``(B, d_g)`` or None."""
    grid = features.layer()
    b, h, w, d = grid.shape
    x = grid.to(device=device, dtype=torch.float32).reshape(b, h * w, d)
    g = features.global_token
    return x, h, w, (None if g is None else g.to(device=device, dtype=torch.float32))


def _adam(params: list[torch.Tensor], lr: float, betas: tuple[float, float], device: torch.device) -> torch.optim.Adam:
    """Adam as the release; fused on CUDA (its step counter stays on the device: no ``.item()`` per step).

    The CPU keeps the default implementation, so CPU fits stay bitwise what they were.
    """
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=True if device.type == "cuda" else None)


class AuxTokens:
    """The auxiliary set, read from the feature cache once per fit and kept for every epoch of both stages.

    Patch tokens ``(N, h*w, d)`` and global tokens stay in their stored precision and are upcast to fp32
    per batch on the device. On CUDA they live on the GPU when they take at most ``RESIDENT_FRACTION`` of
    its free memory; otherwise in pinned host memory, each batch gathered there and copied non-blocking
    one batch ahead. Masks (bool, ``(N, S, S)``) and labels follow the tokens. An epoch's order is the
    permutation ``numpy.random.default_rng(seed)`` gives (as :meth:`FeatureSource.batches`), uploaded once
    per epoch, so a CPU and a GPU fit see the same batches.
    """

    def __init__(self, data: DataSource, device: torch.device, masks: bool, log: Any = None) -> None:
        n = len(data)
        native = {"native": True} if isinstance(data, FeatureSource) else {}
        self.device = device
        self.x: torch.Tensor | None = None
        self.g: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None
        self.labels = torch.empty(n, dtype=torch.long)
        self.h = self.w = 0
        start = 0
        for batch in data.batches(64, masks=masks, **native):
            if batch.features is None:
                raise ZsadError("spg needs cached backbone features; the data source gave none")
            if masks and batch.masks is None:
                raise ZsadError("spg needs pixel masks of the auxiliary set; use an aux dataset with masks")
            grid = batch.features.layer()
            b, h, w, d = grid.shape
            if self.x is None:
                self.h, self.w = h, w
                g0 = batch.features.global_token
                size = batch.masks.shape[-1] if batch.masks is not None else 0
                self.resident = self._fits(
                    n * (h * w * d + (0 if g0 is None else g0[0].numel())) * grid.element_size() + n * size * size
                )
                self.x = self._alloc((n, h * w, d), grid.dtype)
                self.g = None if g0 is None else self._alloc((n, *g0.shape[1:]), g0.dtype)
                self.masks = None if batch.masks is None else self._alloc((n, size, size), torch.bool)
                if log is not None:
                    where = (
                        "resident on the GPU"
                        if self.resident and device.type == "cuda"
                        else ("in pinned host memory (batches prefetched)" if device.type == "cuda" else "in memory")
                    )
                    gb = n * h * w * d * grid.element_size() / 2**30
                    log(f"spg: {n} aux images' tokens ({gb:.2f} GiB, {str(grid.dtype).removeprefix('torch.')}) {where}")
            sl = slice(start, start + b)
            self.x[sl].copy_(grid.reshape(b, h * w, d), non_blocking=True)
            if self.g is not None and batch.features.global_token is not None:
                self.g[sl].copy_(batch.features.global_token, non_blocking=True)
            if self.masks is not None and batch.masks is not None:
                self.masks[sl].copy_(batch.masks > 0.5, non_blocking=True)
            self.labels[sl] = batch.labels
            start += b
        self.n = start
        self.labels = self.labels.to(self.x.device if self.x is not None else "cpu")

    def _fits(self, nbytes: int) -> bool:
        if self.device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(self.device)
        return nbytes <= RESIDENT_FRACTION * free

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.resident:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    @property
    def dim(self) -> int:
        assert self.x is not None
        return self.x.shape[-1]

    def batches(
        self, batch_size: int, seed: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]]:
        """``(tokens (B, h*w, d) fp32, global (B, d_g) fp32 or None, masks (B, S, S) float or None, labels)``
        on the device, in the order of ``seed``'s permutation (storage order without a seed)."""
        assert self.x is not None
        order = np.random.default_rng(seed).permutation(self.n) if seed is not None else np.arange(self.n)
        order_t = torch.from_numpy(order).to(self.labels.device, non_blocking=True)
        chunks = [order_t[s : s + batch_size] for s in range(0, self.n, batch_size)]
        if self.resident:
            for idx in chunks:
                yield self._gather(idx)
            return
        ahead = self._gather(chunks[0]) if chunks else None
        for i in range(len(chunks)):
            current, ahead = ahead, (self._gather(chunks[i + 1]) if i + 1 < len(chunks) else None)
            assert current is not None
            yield current

    def _gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        def take(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
            if t is None:
                return None
            if self.resident:
                part = t.index_select(0, idx)
            else:  # pinned gather, then an asynchronous upload
                part = torch.empty((len(idx), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
                torch.index_select(t, 0, idx, out=part)
                part = part.to(self.device, non_blocking=True)
            return part if dtype is None else part.to(dtype)

        return (
            take(self.x, torch.float32),
            take(self.g, torch.float32),
            take(self.masks, torch.float32),
            take(self.labels, None),
        )


@register_method
class SPG(Detector):
    """SPG with the official release's defaults (TopK SAE H=4096 k=32, L1-sparse guides, EMA, σ=4 smoothing).

    Paper vs code (code is the default, the paper's form is an option): guide lr 0.01 (paper
    ``guide_lr=0.001``), guide batch 8 (paper ``guide_batch_size=16``), the extra global-token
    detection guides with a CE on raw cosines (paper ``global_guides=False``), L1 as λ·mean over the
    code's four guide rows (paper ``l1_reduction="sum"``: λ(‖c_n‖₁+‖c_a‖₁)), Gaussian σ=4 map smoothing
    (paper ``sigma=0``), TopK guides with a straight-through estimator after ReLU and dead mask
    (paper ``guide_topk_ste=False``). Image score: map max; ``aggregation="lse"`` is the paper's
    temperature-controlled log-sum-exp, implemented as the release's log-mean-exp.
    """

    name: ClassVar[str] = "spg"
    display_name: ClassVar[str] = "SPG"
    learning_type: ClassVar[LearningType] = LearningType.ZERO_SHOT
    paper: ClassVar[str] = "Sparse-Projected Guides, arXiv 2604.02871"
    default_backbone: ClassVar[str] = "dinov3"
    artifacts_family: ClassVar[str] = "spg"  # spg-topk reuses the SAEs trained for spg

    @dataclass
    class Config:
        sae_width: int = _opt(4096, "SAE dictionary size H", gt=0)
        sae_k: int = _opt(32, "active latents per token (TopK)", gt=0)
        sae_epochs: int = _opt(50, "Stage-1 epochs", ge=0)
        sae_batch_size: int = _opt(16, "Stage-1 batch (images)", gt=0)
        sae_lr: float = _opt(1e-3, "Stage-1 Adam learning rate", gt=0)
        sae_betas: tuple[float, float] = _opt((0.5, 0.999), "Stage-1 Adam betas, a pair in [0, 1)", pair=True)
        auxk: int = _opt(512, "AuxK: dead latents used to reconstruct the residual", gt=0)
        auxk_coef: float = _opt(1 / 32, "AuxK loss weight", ge=0)
        dead_window_tokens: int = _opt(10_000_000, "tokens without firing before a latent counts as dead", gt=0)
        dead_fire_threshold: float = _opt(1e-3, "activation above which a latent fires", ge=0)
        input_norm: str = _opt("none", "'none' (release) or 'l2' (unit-norm tokens before the SAE)", ("none", "l2"))
        guide_epochs: int = _opt(15, "Stage-2 epochs", ge=0)
        guide_lr: float = _opt(0.01, "Stage-2 Adam learning rate (paper: 0.001)", gt=0)
        guide_betas: tuple[float, float] = _opt((0.5, 0.999), "Stage-2 Adam betas, a pair in [0, 1)", pair=True)
        guide_batch_size: int = _opt(8, "Stage-2 batch (images; paper: 16)", gt=0)
        global_guides: bool = _opt(True, "global-token detection guides with a CE loss (release)")
        tau: float = _opt(0.07, "softmax temperature of the 2-way cosine scores", gt=0)
        l1: float = _opt(1e-3, "L1 weight on the guide coefficients", ge=0)
        l1_reduction: str = _opt("mean", "'mean' (release: λ·mean of 4 rows) or 'sum' (paper)", ("mean", "sum"))
        focal_gamma: float = _opt(2.0, "focal loss gamma", ge=0)
        ema: float = _opt(0.999, "EMA decay of the guide coefficients", ge=0, le=1)
        guide_topk: int | None = _opt(None, "TopK guides (Appendix A): coefficients kept per guide", gt=0)
        guide_topk_ste: bool = _opt(True, "straight-through gradient for TopK guides (release)")
        sigma: float = _opt(4.0, "Gaussian smoothing of the maps (paper: 0)", ge=0, inference=True)
        aggregation: str = _opt("max", "image score from the map", AGGREGATIONS, inference=True)
        agg_tau: float = _opt(1.0, "temperature of aggregation='lse'", gt=0, inference=True)

        def __post_init__(self) -> None:
            for f in dataclasses.fields(self):  # also when built directly, not through parse_overrides
                check_option("spg", f, getattr(self, f.name))
            if self.sae_k > self.sae_width:
                raise ZsadError(f"option spg.sae_k={self.sae_k} exceeds sae_width={self.sae_width}; lower sae_k")

    config: Config

    def __init__(self, backbone: Any, config: Config | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(backbone, config, device)
        self.sae: TopKSAE | None = None
        self.dead_mask: torch.Tensor | None = None
        self.coef: torch.Tensor | None = None
        self.coef_ema: torch.Tensor | None = None
        self.data_fingerprint = ""
        self.stats: dict[str, float] = {}

    # ------------------------------------------------------------------ Stage 1
    def _sae_key(self, fingerprint: str, seed: int, features: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Key of a stored SAE: backbone, aux data, every Stage-1 option, seed, and what the features depend
        on (precision, stored dtype, device class, torch and backbone library versions)."""
        c = self.config
        fields = {
            "backbone": self.backbone.identity,
            "features": {k: features[k] for k in ("precision", "dtype", "key_parts") if k in features},
            "data": fingerprint,
            "width": c.sae_width,
            "k": c.sae_k,
            "epochs": c.sae_epochs,
            "batch": c.sae_batch_size,
            "lr": c.sae_lr,
            "betas": list(c.sae_betas),
            "auxk": c.auxk,
            "auxk_coef": c.auxk_coef,
            "dead_window": c.dead_window_tokens,
            "dead_fire": c.dead_fire_threshold,
            "input_norm": c.input_norm,
            "seed": seed,
        }
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16], fields

    def _sae_input(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1, eps=1e-8) if self.config.input_norm == "l2" else x

    def _sae_step(
        self, sae: TopKSAE, opt: torch.optim.Optimizer, tracker: DeadLatentTracker, x: torch.Tensor, dense_aux: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One Stage-1 step on tokens ``(B, N, d)``; returns (recon MSE, AuxK loss, dead set), all on the
        device: nothing here waits for the device (tests check it op by op)."""
        c = self.config
        x = self._sae_input(x.reshape(-1, x.shape[-1]))
        pre = sae.preactivations(x)
        vals, idx = sparse_topk(pre, c.sae_k)
        atoms = sae.atoms()
        # embedding_bag's CUDA backward has no deterministic kernel: under --deterministic decode densely
        deterministic = dense_aux and torch.are_deterministic_algorithms_enabled()
        x_hat = decode_dense(vals, idx, atoms) if deterministic else decode_sparse(vals, idx, atoms)
        rec = (x_hat - x).pow(2).mean()
        any_dead = tracker.may_have_dead(x.shape[0])
        dead = tracker.update(vals, idx)
        aux = auxk_loss(x, x_hat, pre, dead, atoms, c.auxk, dense_aux) if any_dead else x.new_zeros(())
        loss = rec + c.auxk_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sae.renormalise()
        return rec.detach(), aux.detach(), dead

    def _train_sae(self, tokens: AuxTokens, ctx: FitContext) -> TopKSAE:
        c = self.config
        dim = tokens.dim
        sae = TopKSAE(dim, c.sae_width, c.sae_k, torch.Generator().manual_seed(ctx.seed)).to(ctx.device)
        opt = _adam(list(sae.parameters()), c.sae_lr, tuple(c.sae_betas), ctx.device)
        tracker = DeadLatentTracker(c.sae_width, c.dead_window_tokens, c.dead_fire_threshold, ctx.device)
        dense_aux = dense_auxk(ctx.device)
        wide = torch.float32 if ctx.device.type == "mps" else torch.float64  # sums as the old Python floats
        rec_mean = aux_mean = 0.0
        dead = torch.zeros(c.sae_width, dtype=torch.bool, device=ctx.device)
        for epoch in tqdm(range(c.sae_epochs), desc="SPG stage 1 (SAE)", disable=not ctx.progress, leave=False):
            sums = torch.zeros(2, dtype=wide, device=ctx.device)
            steps = 0
            dead = torch.zeros(c.sae_width, dtype=torch.bool, device=ctx.device)
            for x, _, _, _ in tokens.batches(c.sae_batch_size, seed=ctx.seed + epoch):
                rec, aux, dead = self._sae_step(sae, opt, tracker, x, dense_aux)
                sums[0] += rec.to(wide)
                sums[1] += aux.to(wide)
                steps += 1
            rec_mean, aux_mean = (v / max(steps, 1) for v in sums.tolist())  # the epoch's one read-back
            if _report_epoch(epoch, c.sae_epochs):
                ctx.log(
                    f"spg SAE epoch {epoch + 1}/{c.sae_epochs}: recon mse {rec_mean:.5g}, auxk {aux_mean:.5g}, "
                    f"dead latents {int(dead.sum())}/{c.sae_width}"
                )
        self.stats.update(
            sae_recon_mse=rec_mean,
            sae_auxk_loss=aux_mean,
            sae_dead_latents_train=float(dead.sum()),
        )
        return sae

    @torch.no_grad()
    def _dead_atoms(self, sae: TopKSAE, tokens: AuxTokens, device: torch.device) -> torch.Tensor:
        """Atoms that never fire (``z > 0``) on the aux tokens ``[global, patches]`` (the release's rule)."""
        count = torch.zeros(sae.width, dtype=torch.long, device=device)
        for x, g, _, _ in tokens.batches(self.config.sae_batch_size):
            if g is not None and g.shape[-1] == x.shape[-1]:
                x = torch.cat([g.unsqueeze(1), x], dim=1)
            z = sae.encode(self._sae_input(x.reshape(-1, x.shape[-1])))
            count += (z > 0).sum(0)
        return (count == 0).cpu()

    def _load_sae(self, path: Path, ctx: FitContext) -> bool:
        """Load a stored SAE artifact; a truncated or unreadable one is reported, deleted and refitted."""
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            sae = TopKSAE(blob["encoder"].shape[1], self.config.sae_width, self.config.sae_k)
            sae.encoder.data.copy_(blob["encoder"])
            sae.dictionary.data.copy_(blob["dictionary"])
            dead_mask = blob["dead_mask"].bool()
            if dead_mask.shape != (self.config.sae_width,):
                raise ValueError(f"dead mask of shape {tuple(dead_mask.shape)}")
            stats = {str(k): float(v) for k, v in blob["stats"].items()}
        except Exception as exc:  # a damaged file can fail anywhere in unpickling; the fix is always a refit
            ctx.log(f"warning: {path}: unreadable SAE artifact ({type(exc).__name__}: {exc}); refitting it")
            path.unlink(missing_ok=True)
            return False
        self.sae, self.dead_mask = sae.to(ctx.device), dead_mask
        self.stats.update(stats)
        ctx.log(f"spg: reusing SAE {path.name} (H={self.config.sae_width}, k={self.config.sae_k})")
        return True

    def _stage1(self, tokens: AuxTokens, ctx: FitContext, features: dict[str, Any]) -> None:
        key, fields = self._sae_key(self.data_fingerprint, ctx.seed, features)
        path = None if ctx.artifacts_dir is None else Path(ctx.artifacts_dir) / f"spg-sae-{key}.pt"
        if path is not None and path.is_file() and self._load_sae(path, ctx):
            return
        sae = self._train_sae(tokens, ctx)
        sae.eval()
        self.sae, self.dead_mask = sae, self._dead_atoms(sae, tokens, ctx.device)
        self.stats["sae_dead_atoms"] = float(self.dead_mask.sum())
        ctx.log(f"spg: SAE trained; {int(self.dead_mask.sum())}/{sae.width} atoms never fire on the aux set")
        if path is not None:
            blob = {
                "key": fields,
                "encoder": sae.encoder.detach().cpu(),
                "dictionary": sae.dictionary.detach().cpu(),
                "dead_mask": self.dead_mask,
                "stats": dict(self.stats),
            }
            buf = io.BytesIO()
            torch.save(blob, buf)
            atomic_write_bytes(path, buf.getvalue())

    # ------------------------------------------------------------------ Stage 2
    def coefficients(self, raw: torch.Tensor) -> torch.Tensor:
        """Effective coefficients (ReLU, dead mask, optional TopK) of raw ``C`` ``(4, H)``."""
        if self.dead_mask is None:
            raise ZsadError("spg has not been fitted; run fit() or load a checkpoint first")
        alive = ~self.dead_mask.to(raw.device)
        return effective_coefficients(raw, alive, self.config.guide_topk, self.config.guide_topk_ste)

    def _l1(self, c: torch.Tensor, with_global: bool) -> torch.Tensor:
        cfg = self.config
        if cfg.guide_topk is not None:
            return c.new_zeros(())
        if cfg.l1_reduction == "sum":
            return cfg.l1 * c[2:].abs().sum()
        rows = c if with_global else c[2:]
        return cfg.l1 / 4 * rows.abs().sum()

    def _guide_step(
        self,
        raw: torch.Tensor,
        opt: torch.optim.Optimizer,
        ema: EMA,
        atoms: torch.Tensor,
        alive: torch.Tensor,
        batch: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor],
        h: int,
        w: int,
    ) -> torch.Tensor:
        """One Stage-2 step; returns ``[loss, seg, det]`` on the device (no host sync, as :meth:`_sae_step`)."""
        cfg = self.config
        x, g, y, labels = batch
        assert y is not None
        c = effective_coefficients(raw, alive, cfg.guide_topk, cfg.guide_topk_ste)
        guides = c @ atoms
        prob = anomaly_probability(cosine_to_guides(x, guides[2:]), cfg.tau).view(-1, h, w)
        m = upsample_map(prob, y.shape[-1])
        seg = focal_loss(m, y, cfg.focal_gamma) + dice_loss(m, y) + dice_loss(1 - m, 1 - y)
        with_global = cfg.global_guides and g is not None and g.shape[-1] == x.shape[-1]
        det = F.cross_entropy(cosine_to_guides(g, guides[:2]), labels) if with_global else seg.new_zeros(())
        loss = seg + det + self._l1(c, with_global)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(raw)
        return torch.stack([loss, seg, det]).detach()

    def _stage2(self, tokens: AuxTokens, ctx: FitContext) -> None:
        cfg, sae = self.config, self.sae
        assert sae is not None and self.dead_mask is not None
        gen = torch.Generator().manual_seed(ctx.seed)
        raw = (0.1 + 0.01 * torch.randn(4, cfg.sae_width, generator=gen)).to(ctx.device).requires_grad_(True)
        opt = _adam([raw], cfg.guide_lr, tuple(cfg.guide_betas), ctx.device)
        ema = EMA(cfg.ema)
        atoms = sae.atoms().detach()
        alive = ~self.dead_mask.to(ctx.device)
        wide = torch.float32 if ctx.device.type == "mps" else torch.float64
        names = ("guide_loss", "guide_seg_loss", "guide_det_loss")
        parts = dict.fromkeys(names, 0.0)
        for epoch in tqdm(range(cfg.guide_epochs), desc="SPG stage 2 (guides)", disable=not ctx.progress, leave=False):
            sums = torch.zeros(3, dtype=wide, device=ctx.device)
            steps = 0
            for batch in tokens.batches(cfg.guide_batch_size, seed=ctx.seed + epoch):
                sums += self._guide_step(raw, opt, ema, atoms, alive, batch, tokens.h, tokens.w).to(wide)
                steps += 1
            parts = {k: v / max(steps, 1) for k, v in zip(names, sums.tolist(), strict=True)}
            if _report_epoch(epoch, cfg.guide_epochs):
                ctx.log(f"spg guides epoch {epoch + 1}/{cfg.guide_epochs}: loss {parts['guide_loss']:.5g}")
        self.coef = raw.detach()
        self.coef_ema = ema.value if ema.value is not None else raw.detach().clone()
        self.stats.update(parts)

    def fit(self, data: DataSource, ctx: FitContext) -> None:
        """Stage 1 (SAE, cached in ``ctx.artifacts_dir`` and reused) then Stage 2 (guide coefficients).

        The aux set is read once (:class:`AuxTokens`); the fit runs at the features' precision (TF32
        matmuls on CUDA only for ``tf32``).
        """
        if len(data) == 0:
            raise ZsadError("spg: the auxiliary data set is empty; check --aux and --aux-categories")
        self.stats = {}
        self.data_fingerprint = samples_fingerprint(data.samples)
        features = data.feature_info if isinstance(data, FeatureSource) else {}
        with precision_context(features.get("precision", "fp32")):
            tokens = AuxTokens(data, ctx.device, masks=self.config.guide_epochs > 0, log=ctx.log)
            self._stage1(tokens, ctx, features)
            self._stage2(tokens, ctx)

    # ------------------------------------------------------------------ inference
    def _require_fitted(self) -> tuple[TopKSAE, torch.Tensor]:
        if self.sae is None or self.coef_ema is None:
            raise ZsadError("spg has not been fitted; run fit() or load a checkpoint first")
        return self.sae, self.coef_ema

    def local_guides(self) -> torch.Tensor:
        """The (normal, anomaly) local guide vectors ``(2, d)`` from the EMA coefficients."""
        sae, coef = self._require_fitted()
        return self.coefficients(coef)[2:] @ sae.atoms()

    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        if batch.features is None:
            raise ZsadError("spg needs cached backbone features; the batch has none")
        sae, _ = self._require_fitted()
        cfg = self.config
        x, h, w, _ = _tokens(batch.features, sae.dictionary.device)
        prob = anomaly_probability(cosine_to_guides(x, self.local_guides()), cfg.tau).view(-1, h, w)
        maps = gaussian_smooth(upsample_map(prob, self.backbone.image_size), cfg.sigma)
        return Prediction(maps.cpu(), aggregate_scores(maps, cfg.aggregation, cfg.agg_tau).cpu())

    # ------------------------------------------------------------------ atoms (interpretability)
    def anomaly_atoms(self) -> list[tuple[int, float]]:
        """Active atoms of the local anomaly guide (EMA row 3) as ``(atom id, coefficient)``, largest first."""
        _, coef = self._require_fitted()
        c = self.coefficients(coef)[3].cpu()
        order = torch.argsort(c, descending=True)
        return [(int(i), float(c[i])) for i in order if c[i] > 0]

    @torch.no_grad()
    def atom_activations(self, features: Features, atoms: list[int]) -> torch.Tensor:
        """TopK-SAE activations ``z_a`` of ``atoms`` on the patch grid: ``(B, len(atoms), h, w)``."""
        sae, _ = self._require_fitted()
        x, h, w, _ = _tokens(features, sae.dictionary.device)
        z = sae.encode(self._sae_input(x))[..., atoms]
        return z.permute(0, 2, 1).reshape(x.shape[0], len(atoms), h, w).cpu()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        sae, coef_ema = self._require_fitted()
        assert self.coef is not None and self.dead_mask is not None
        return {
            "format": STATE_FORMAT,
            "config": dataclasses.asdict(self.config),
            "backbone": self.backbone.identity,
            "data_fingerprint": self.data_fingerprint,
            "sae_width": sae.width,
            "sae_k": sae.k,
            "encoder": sae.encoder.detach().cpu(),
            "dictionary": sae.dictionary.detach().cpu(),
            "dead_mask": self.dead_mask.cpu(),
            "coef": self.coef.cpu(),
            "coef_ema": coef_ema.cpu(),
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ZsadError(f"not an SPG checkpoint (format {state.get('format')!r}); re-fit spg")
        if state["backbone"] != self.backbone.identity:
            raise ZsadError(
                f"SPG checkpoint was trained on backbone '{state['backbone']}', not '{self.backbone.identity}'; "
                "use the same --backbone/--image-size or re-fit"
            )
        if state["sae_width"] != self.config.sae_width or state["sae_k"] != self.config.sae_k:
            raise ZsadError(
                f"SPG checkpoint has SAE width {state['sae_width']} k {state['sae_k']}, config asks "
                f"{self.config.sae_width}/{self.config.sae_k}; pass --set sae_width={state['sae_width']} "
                f"--set sae_k={state['sae_k']} or re-fit"
            )
        enc = state["encoder"]
        sae = TopKSAE(enc.shape[1], state["sae_width"], state["sae_k"])
        sae.encoder.data.copy_(enc)
        sae.dictionary.data.copy_(state["dictionary"])
        self.sae = sae.eval().to(self.device)
        self.dead_mask = state["dead_mask"].bool()
        self.coef = state["coef"].to(self.device)
        self.coef_ema = state["coef_ema"].to(self.device)
        self.data_fingerprint = state["data_fingerprint"]
        self.stats = dict(state["stats"])

    def summary(self) -> dict[str, float]:
        """Guide sparsity |A_n| + |A_a| (non-zero effective EMA local coefficients), dead latents, losses."""
        if self.coef_ema is None:
            return {}
        local = self.coefficients(self.coef_ema)[2:]
        nonzero = (local > 0).sum(1)
        return {
            "guide_sparsity": float(nonzero.sum()),
            "guide_nonzero_normal": float(nonzero[0]),
            "guide_nonzero_anomaly": float(nonzero[1]),
            **{k: v for k, v in self.stats.items() if math.isfinite(v)},
        }


@register_method
class SPGTopK(SPG):
    """SPG with TopK guides (paper Appendix A): the ``guide_topk`` largest coefficients per guide, no L1."""

    name: ClassVar[str] = "spg-topk"
    display_name: ClassVar[str] = "SPG-TopK"

    @dataclass
    class Config(SPG.Config):
        guide_topk: int | None = _opt(64, "TopK guides (Appendix A): coefficients kept per guide", gt=0)
