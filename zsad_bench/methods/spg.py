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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from tqdm import tqdm

from zsad_bench.backbones.base import Features
from zsad_bench.data import samples_fingerprint
from zsad_bench.detector import Batch, DataSource, Detector, FitContext, LearningType, Prediction, register_method
from zsad_bench.errors import ZsadError
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
    upsample_map,
)
from zsad_bench.postprocess import dice_loss, gaussian_smooth
from zsad_bench.results import atomic_write_bytes

STATE_FORMAT = "spg/v1"
AGGREGATIONS = ("max", "mean", "lse")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ZsadError(f"option spg.{name}: '{value}' is not one of {', '.join(choices)}; fix --set {name}=...")


def _report_epoch(epoch: int, total: int) -> bool:
    """Log the first, every 10th and the last epoch (the progress bar shows the rest)."""
    return epoch == 0 or epoch + 1 == total or (epoch + 1) % 10 == 0


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ZsadError(f"option spg.{name}: must be > 0 (got {value}); fix --set {name}=...")


def _tokens(features: Features, device: torch.device) -> tuple[torch.Tensor, int, int, torch.Tensor | None]:
    """Patch tokens ``(B, N, d)`` (row-major), grid ``h, w`` and the global token ``(B, d_g)`` or None."""
    grid = features.layer()
    b, h, w, d = grid.shape
    x = grid.to(device=device, dtype=torch.float32).reshape(b, h * w, d)
    g = features.global_token
    return x, h, w, (None if g is None else g.to(device=device, dtype=torch.float32))


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
    inference_options: ClassVar[tuple[str, ...]] = ("aggregation", "agg_tau", "sigma")
    artifacts_family: ClassVar[str] = "spg"  # spg-topk reuses the SAEs trained for spg

    @dataclass
    class Config:
        sae_width: int = 4096
        sae_k: int = 32
        sae_epochs: int = 50
        sae_batch_size: int = 16
        sae_lr: float = 1e-3
        sae_betas: tuple[float, float] = (0.5, 0.999)
        auxk: int = 512
        auxk_coef: float = 1 / 32
        dead_window_tokens: int = 10_000_000
        dead_fire_threshold: float = 1e-3
        input_norm: str = "none"  # "none" (release) or "l2" (per-token unit norm before the SAE)
        guide_epochs: int = 15
        guide_lr: float = 0.01
        guide_betas: tuple[float, float] = (0.5, 0.999)
        guide_batch_size: int = 8
        global_guides: bool = True
        tau: float = 0.07
        l1: float = 1e-3
        l1_reduction: str = "mean"  # "mean" (release: λ·mean of 4 rows) or "sum" (paper)
        focal_gamma: float = 2.0
        ema: float = 0.999
        guide_topk: int | None = None
        guide_topk_ste: bool = True
        sigma: float = 4.0
        aggregation: str = "max"
        agg_tau: float = 1.0

        def __post_init__(self) -> None:
            _check_choice("aggregation", self.aggregation, AGGREGATIONS)
            _check_choice("l1_reduction", self.l1_reduction, ("mean", "sum"))
            _check_choice("input_norm", self.input_norm, ("none", "l2"))
            for name in ("sae_width", "sae_k", "sae_batch_size", "auxk", "guide_batch_size", "tau", "agg_tau"):
                _check_positive(name, getattr(self, name))
            for name in ("sae_epochs", "guide_epochs"):
                if getattr(self, name) < 0:
                    raise ZsadError(f"option spg.{name}: must be >= 0; fix --set {name}=...")
            if self.guide_topk is not None:
                _check_positive("guide_topk", self.guide_topk)
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
    def _sae_key(self, fingerprint: str, seed: int) -> tuple[str, dict[str, Any]]:
        c = self.config
        fields = {
            "backbone": self.backbone.identity,
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

    def _train_sae(self, data: DataSource, ctx: FitContext) -> TopKSAE:
        c = self.config
        first = next(iter(data.batches(1)))
        if first.features is None:
            raise ZsadError("spg needs cached backbone features; the data source gave none")
        dim = first.features.layer().shape[-1]
        sae = TopKSAE(dim, c.sae_width, c.sae_k, torch.Generator().manual_seed(ctx.seed)).to(ctx.device)
        opt = torch.optim.Adam(sae.parameters(), lr=c.sae_lr, betas=tuple(c.sae_betas))
        tracker = DeadLatentTracker(c.sae_width, c.dead_window_tokens, c.dead_fire_threshold, ctx.device)
        rec_mean = aux_mean = 0.0
        for epoch in tqdm(range(c.sae_epochs), desc="SPG stage 1 (SAE)", disable=not ctx.progress, leave=False):
            rec_sum = aux_sum = 0.0
            steps = 0
            dead = torch.zeros(c.sae_width, dtype=torch.bool)
            for batch in data.batches(c.sae_batch_size, shuffle=True, seed=ctx.seed + epoch):
                x, _, _, _ = _tokens(batch.features, ctx.device)
                x = self._sae_input(x.reshape(-1, dim))
                pre = sae.preactivations(x)
                vals, idx = sparse_topk(pre, c.sae_k)
                atoms = sae.atoms()
                x_hat = decode_sparse(vals, idx, atoms)
                rec = (x_hat - x).pow(2).mean()
                dead = tracker.update(vals, idx)
                aux = auxk_loss(x, x_hat, pre, dead, atoms, c.auxk)
                loss = rec + c.auxk_coef * aux
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sae.renormalise()
                rec_sum, aux_sum, steps = rec_sum + rec.item(), aux_sum + aux.item(), steps + 1
            rec_mean, aux_mean = rec_sum / max(steps, 1), aux_sum / max(steps, 1)
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
    def _dead_atoms(self, sae: TopKSAE, data: DataSource, device: torch.device) -> torch.Tensor:
        """Atoms that never fire (``z > 0``) on the aux tokens ``[global, patches]`` (the release's rule)."""
        count = torch.zeros(sae.width, dtype=torch.long, device=device)
        for batch in data.batches(self.config.sae_batch_size):
            x, _, _, g = _tokens(batch.features, device)
            if g is not None and g.shape[-1] == x.shape[-1]:
                x = torch.cat([g.unsqueeze(1), x], dim=1)
            z = sae.encode(self._sae_input(x.reshape(-1, x.shape[-1])))
            count += (z > 0).sum(0)
        return (count == 0).cpu()

    def _stage1(self, data: DataSource, ctx: FitContext) -> None:
        key, fields = self._sae_key(self.data_fingerprint, ctx.seed)
        path = None if ctx.artifacts_dir is None else Path(ctx.artifacts_dir) / f"spg-sae-{key}.pt"
        if path is not None and path.is_file():
            blob = torch.load(path, map_location="cpu", weights_only=True)
            sae = TopKSAE(blob["encoder"].shape[1], self.config.sae_width, self.config.sae_k)
            sae.encoder.data.copy_(blob["encoder"])
            sae.dictionary.data.copy_(blob["dictionary"])
            self.sae, self.dead_mask = sae.to(ctx.device), blob["dead_mask"]
            self.stats.update(blob["stats"])
            ctx.log(f"spg: reusing SAE {path.name} (H={self.config.sae_width}, k={self.config.sae_k})")
            return
        sae = self._train_sae(data, ctx)
        sae.eval()
        self.sae, self.dead_mask = sae, self._dead_atoms(sae, data, ctx.device)
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

    def _aux_masks(self, data: DataSource) -> dict[Any, torch.Tensor]:
        """Binary S x S masks of the aux samples, read once (decoding them every epoch dominated CPU fits)."""
        out: dict[Any, torch.Tensor] = {}
        for batch in data.batches(self.config.guide_batch_size, masks=True):
            if batch.masks is None:
                raise ZsadError("spg needs pixel masks of the auxiliary set; use an aux dataset with masks")
            for sample, mask in zip(batch.samples, batch.masks > 0.5, strict=True):
                out[sample] = mask
        return out

    def _stage2(self, data: DataSource, ctx: FitContext) -> None:
        cfg, sae = self.config, self.sae
        assert sae is not None
        gen = torch.Generator().manual_seed(ctx.seed)
        raw = (0.1 + 0.01 * torch.randn(4, cfg.sae_width, generator=gen)).to(ctx.device).requires_grad_(True)
        opt = torch.optim.Adam([raw], lr=cfg.guide_lr, betas=tuple(cfg.guide_betas))
        ema = EMA(cfg.ema)
        atoms = sae.atoms().detach()
        parts = {"guide_loss": 0.0, "guide_seg_loss": 0.0, "guide_det_loss": 0.0}
        masks = self._aux_masks(data) if cfg.guide_epochs else {}
        for epoch in tqdm(range(cfg.guide_epochs), desc="SPG stage 2 (guides)", disable=not ctx.progress, leave=False):
            sums = dict.fromkeys(parts, 0.0)
            steps = 0
            for batch in data.batches(cfg.guide_batch_size, shuffle=True, seed=ctx.seed + epoch):
                x, h, w, g = _tokens(batch.features, ctx.device)
                y = torch.stack([masks[s] for s in batch.samples]).to(ctx.device).float()
                c = self.coefficients(raw)
                guides = c @ atoms
                prob = anomaly_probability(cosine_to_guides(x, guides[2:]), cfg.tau).view(-1, h, w)
                m = upsample_map(prob, y.shape[-1])
                seg = focal_loss(m, y, cfg.focal_gamma) + dice_loss(m, y) + dice_loss(1 - m, 1 - y)
                with_global = cfg.global_guides and g is not None and g.shape[-1] == x.shape[-1]
                det = (
                    F.cross_entropy(cosine_to_guides(g, guides[:2]), batch.labels.to(ctx.device))
                    if with_global
                    else seg.new_zeros(())
                )
                loss = seg + det + self._l1(c, with_global)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ema.update(raw)
                for name, v in (("guide_loss", loss), ("guide_seg_loss", seg), ("guide_det_loss", det)):
                    sums[name] += v.item()
                steps += 1
            parts = {k: v / max(steps, 1) for k, v in sums.items()}
            if _report_epoch(epoch, cfg.guide_epochs):
                ctx.log(f"spg guides epoch {epoch + 1}/{cfg.guide_epochs}: loss {parts['guide_loss']:.5g}")
        self.coef = raw.detach()
        self.coef_ema = ema.value if ema.value is not None else raw.detach().clone()
        self.stats.update(parts)

    def fit(self, data: DataSource, ctx: FitContext) -> None:
        """Stage 1 (SAE, cached in ``ctx.artifacts_dir`` and reused) then Stage 2 (guide coefficients)."""
        if len(data) == 0:
            raise ZsadError("spg: the auxiliary data set is empty; check --aux and --aux-categories")
        self.stats = {}
        self.data_fingerprint = samples_fingerprint(data.samples)
        self._stage1(data, ctx)
        self._stage2(data, ctx)

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
        guide_topk: int | None = 64
