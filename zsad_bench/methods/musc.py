"""MuSc: training-free zero-shot anomaly scoring by mutual scoring of the unlabeled test images.

Li, Huang, Zhang, Liu, Xu, Shen, "MuSc: Zero-Shot Industrial Anomaly Classification and Segmentation
with Mutual Scoring of the Unlabeled Images", ICLR 2024; official code github.com/xrli-U/MuSc
(``models/musc.py``, ``models/modules/_LNAMD.py``, ``_MSM.py``, ``_RsCIN.py``).

**Transductive**: every test image of a category is scored against all *other* test images of the
same category (normal patches find close matches in the other images, anomalous ones do not), so
:meth:`MuSc.predict_source` reads the whole category before it yields anything, and results depend
on which images are evaluated together. :meth:`MuSc.predict` scores one batch against itself.

Steps, as in the official code:

* LNAMD (local neighbourhood aggregation): per image and layer, LayerNorm over the whole ``(C, h, w)``
  map (no affine), then the mean over each ``r x r`` patch neighbourhood with zero padding
  (PatchCore ``Unfold`` + ``adaptive_avg_pool1d`` = average pooling counting the padding), then L2
  normalisation per patch; ``r`` in ``{1, 3, 5}``.
* MSM (mutual scoring): for a patch of image i and each other image j, the Euclidean distance to the
  nearest patch of j; the patch score is the mean of the smallest 30% of these N-1 distances
  ("interval average" over ranks ``[int(0 (N-1)), int(0.3 (N-1)))``). Scores are averaged over the
  layers and over ``r``, then bilinearly upsampled (``align_corners=True``) to the input size S.
  No smoothing.
* Image score: the map maximum, re-scored by RsCIN (``rscin_k``; MVTec AD ``1,2,3``, VisA ``1,8,9``;
  empty = off): scores are min-max normalised over the category, then averaged over the ``k`` most
  similar images (similarity of global image embeddings, self included) and over the values of ``k``.

Paper setting (``--preset paper``; official ``configs/musc.yaml``, ``scripts/musc_*.sh``): CLIP
ViT-L/14@336 (openai; ``openclip`` here) at 518 px, the outputs of blocks 6/12/18/24 (``feature_layers:
[5, 11, 17, 23]`` +1, ``models/musc.py:59``), averaged over the 4 layers and the 3 values of ``r``
(``models/musc.py:207-216``). For CLIP these are the raw residual-stream outputs (the repo's
``open_clip/transformer.py:336`` appends ``x`` before ``ln_post``); for DINOv2 (``dinov2_vitl14``) they
come from ``get_intermediate_layers(n=[5, 11, 17, 23])`` (``models/musc.py:164``), whose ``norm=True``
default passes them through the final LayerNorm (``models/backbone/dino_vision_transformer.py:276-277``),
i.e. layer names ``"6:norm"``... here. :meth:`MuSc.layers_for` picks these for any ViT: 4 evenly spaced
blocks ``n/4, n/2, 3n/4, n`` of ``capabilities.num_blocks`` (ViT-B: 3/6/9/12, as the official ViT-B runs),
raw on backbones with a text tower (CLIP), final-normed on the others when the backbone offers normed
layers. RsCIN windows come from the target (``dataset_defaults``): MVTec AD ``1,2,3``, VisA ``1,8,9``
(``models/musc.py:242-247``). All layers present in the features are averaged; on a backbone without
numbered blocks (``effnet-lite0``) its default layers are used.

Differences: RsCIN uses cosine similarity of the backbone's global token (official: the raw dot product
of the CLIP/DINO image embedding), or of the mean patch token when the backbone has no global token.
When ``int(0.3 (N-1)) == 0`` (fewer than 5 images) the single nearest image is used instead of the empty
mean. Images are processed in fp32 (official: CUDA autocast).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from zsad_bench.backbones.base import Backbone, Features
from zsad_bench.detector import Batch, DataSource, Detector, LearningType, Prediction, register_method
from zsad_bench.errors import ZsadError
from zsad_bench.presets import PaperSetting


def lnamd(grid: torch.Tensor, r: int) -> torch.Tensor:
    """LNAMD features ``(B, h*w, C)`` (unit norm) of a token grid ``(B, h, w, C)`` with neighbourhood ``r``."""
    x = grid.float().permute(0, 3, 1, 2)
    x = F.layer_norm(x, x.shape[1:])
    if r > 1:
        x = F.avg_pool2d(x, r, stride=1, padding=(r - 1) // 2, count_include_pad=True)
    return F.normalize(x.flatten(2).transpose(1, 2), dim=-1)


def nearest_patch_distances(z: torch.Tensor, pair_budget: int = 1 << 26) -> torch.Tensor:
    """``d[i, j, p]`` = Euclidean distance of patch p of image i to its nearest patch of image j.

    ``z`` is ``(N, L, C)``; the diagonal ``j == i`` is ``inf``. Each image pair is computed once and used
    in both directions; ``pair_budget`` bounds the elements of one block of squared distances.
    """
    n, length, _ = z.shape
    z = z.float()
    sq = (z * z).sum(-1)
    out = torch.full((n, n, length), float("inf"), device=z.device)
    step = max(1, pair_budget // (length * length))
    for i in range(n - 1):
        for start in range(i + 1, n, step):
            stop = min(n, start + step)
            d2 = sq[i][None, :, None] + sq[start:stop, None, :] - 2.0 * torch.einsum("pc,jqc->jpq", z[i], z[start:stop])
            out[i, start:stop] = d2.min(dim=2).values
            out[start:stop, i] = d2.min(dim=1).values
    return out.clamp_min(0.0).sqrt()


def interval_average(d: torch.Tensor, low: float = 0.0, high: float = 0.3) -> torch.Tensor:
    """MSM interval average: ``(N, N, L)`` distances (diagonal excluded) -> ``(N, L)`` patch scores.

    Over the ``m = N - 1`` other images, the mean of the sorted-ascending values at ranks
    ``[int(low m), max(int(high m), 1))``.
    """
    n = d.shape[0]
    m = n - 1
    eye = torch.eye(n, dtype=torch.bool, device=d.device)
    others = d[~eye].view(n, m, -1)  # (N, m, L)
    k_hi = max(int(m * high), 1)
    k_lo = min(int(m * low), k_hi - 1)
    ordered = others.sort(dim=1).values
    return ordered[:, k_lo:k_hi].mean(dim=1)


def evenly_spaced_blocks(num_blocks: int, count: int = 4) -> tuple[int, ...]:
    """``count`` evenly spaced 1-based block indices ending at the last block (24 -> 6, 12, 18, 24)."""
    return tuple(dict.fromkeys(max(1, num_blocks * i // count) for i in range(1, count + 1)))


def rscin(scores: torch.Tensor, embeddings: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """RsCIN re-scoring: min-max normalised ``scores`` averaged over each image's ``k`` most similar images."""
    if not ks:
        return scores
    s = scores.double()
    span = s.max() - s.min()
    s = (s - s.min()) / span if span > 0 else torch.zeros_like(s)
    e = F.normalize(embeddings.double(), dim=-1)
    w = e @ e.T
    n = w.shape[0]
    out = torch.zeros_like(s)
    for k in ks:
        keep = w.topk(min(k, n), dim=1).indices
        wk = torch.zeros_like(w).scatter(1, keep, w.gather(1, keep))
        out += (wk @ s) / wk.sum(dim=1)
    return (out / len(ks)).float()


@register_method
class MuSc(Detector):
    """Training-free, transductive mutual scoring (see module docstring)."""

    name = "musc"
    display_name = "MuSc"
    learning_type = LearningType.TRAINING_FREE
    paper = "Li et al., MuSc, ICLR 2024 (github.com/xrli-U/MuSc)"
    default_backbone = "openclip"
    paper_setting: ClassVar[PaperSetting] = PaperSetting(
        "openclip", 518, note="CLIP ViT-L/14@336 (openai) at 518 px, raw outputs of blocks 6/12/18/24 averaged"
    )
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "mvtec": {"rscin_k": (1, 2, 3)},
        "visa": {"rscin_k": (1, 8, 9)},
    }

    @dataclass
    class Config:
        r_list: tuple[int, ...] = field(
            default=(1, 3, 5), metadata={"inference": True, "help": "LNAMD neighbourhood sizes (odd)"}
        )
        interval_low: float = field(
            default=0.0, metadata={"inference": True, "ge": 0.0, "lt": 1.0, "help": "MSM interval: lower fraction"}
        )
        interval_high: float = field(
            default=0.3, metadata={"inference": True, "gt": 0.0, "le": 1.0, "help": "MSM interval: upper fraction"}
        )
        rscin_k: tuple[int, ...] = field(
            default=(1, 2, 3),
            metadata={
                "inference": True,
                "help": "RsCIN windows (MVTec AD 1,2,3; VisA 1,8,9); empty: off",
            },
        )

    @classmethod
    def layers_for(cls, capabilities: Any) -> tuple[str, ...] | None:
        """Blocks n/4, n/2, 3n/4, n of a ViT (raw with a text tower, else final-normed when offered); else None."""
        num_blocks = getattr(capabilities, "num_blocks", None)
        if not num_blocks:
            return None
        normed = bool(getattr(capabilities, "normed_layers", False)) and not getattr(capabilities, "text", False)
        return tuple(f"{b}:norm" if normed else str(b) for b in evenly_spaced_blocks(num_blocks))

    def __init__(self, backbone: Backbone, config: Config | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__(backbone, config, device)
        cfg = self.config
        if not cfg.r_list or any(r < 1 or r % 2 == 0 for r in cfg.r_list):
            raise ZsadError(f"option musc.r_list={cfg.r_list}: use odd sizes >= 1, e.g. 1,3,5")
        if not 0.0 <= cfg.interval_low < cfg.interval_high <= 1.0:
            raise ZsadError(
                f"options musc.interval_low/high={cfg.interval_low}/{cfg.interval_high}: need 0 <= low < high <= 1"
            )
        if any(k < 1 for k in cfg.rscin_k):
            raise ZsadError(f"option musc.rscin_k={cfg.rscin_k}: use integers >= 1 (or none to disable RsCIN)")

    def score(self, features: Sequence[Features]) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps ``(N, S, S)`` and image scores ``(N,)`` of all images whose features are given (N >= 2)."""
        layers = list(features[0].patches)
        grids = {name: torch.cat([f.patches[name] for f in features]).to(self.device) for name in layers}
        n, h, w, _ = grids[layers[0]].shape
        if n < 2:
            raise ZsadError("musc: mutual scoring needs at least 2 test images of a category; add test images")
        total = torch.zeros(n, h * w, device=self.device)
        for r in self.config.r_list:
            for name in layers:
                if grids[name].shape[1:3] != (h, w):
                    raise ZsadError(f"musc: layer '{name}' has a different grid than '{layers[0]}'")
                d = nearest_patch_distances(lnamd(grids[name], r))
                total += interval_average(d, self.config.interval_low, self.config.interval_high)
        patch_scores = (total / (len(layers) * len(self.config.r_list))).view(n, 1, h, w)
        size = self.backbone.image_size
        maps = F.interpolate(patch_scores, size=(size, size), mode="bilinear", align_corners=True)[:, 0]
        scores = maps.flatten(1).max(dim=1).values
        if self.config.rscin_k:
            scores = rscin(scores, self._embeddings(features, layers[-1]), self.config.rscin_k)
        return maps, scores

    def _embeddings(self, features: Sequence[Features], last: str) -> torch.Tensor:
        if all(f.global_token is not None for f in features):
            return torch.cat([f.global_token for f in features]).to(self.device).float()
        return torch.cat([f.patches[last].float().mean(dim=(1, 2)) for f in features]).to(self.device)

    def predict(self, batch: Batch) -> Prediction:
        """Mutual scoring within this batch only (use :meth:`predict_source` for a whole category)."""
        if batch.features is None:
            raise ZsadError("musc: batch carries no features")
        return Prediction(*self.score([batch.features]))

    def predict_source(self, data: DataSource, batch_size: int = 8) -> Iterator[tuple[Batch, Prediction]]:
        """Score every image against all other images of ``data`` (one category); yields per batch.

        The yielded batches carry no features (they are released after scoring).
        """
        batches = list(data.batches(batch_size))
        if not batches:
            return
        if any(b.features is None for b in batches):
            raise ZsadError("musc: data source carries no features")
        maps, scores = self.score([b.features for b in batches])
        start = 0
        for b in batches:
            stop = start + len(b.samples)
            yield replace(b, features=None), Prediction(maps[start:stop], scores[start:stop])
            start = stop
