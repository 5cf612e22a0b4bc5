"""SPG's own inference cost per image against the backbone forward it sits on.

SPG part = ``SPG.predict`` on cached tokens: decode the guides through the SAE dictionary (D^T c),
cosine to both guides, 2-way softmax, bilinear upsampling to S x S, Gaussian smoothing (σ=4) and
max pooling, maps returned on the CPU (what the runner consumes).

    python benchmarks/bench_spg.py                       # CPU: effnet-lite0 @224 (fp32)
    python benchmarks/bench_spg.py --device cuda --reference dinov3-l   # GPU: DINOv3 ViT-L/16 @448, bf16

The DINOv3-L reference is timm's ``vit_large_patch16_dinov3`` architecture with random weights
(timing does not depend on the weights, and the hub is not needed).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from tabulate import tabulate

from zsad_bench.backbones.base import Backbone, Features, Preprocess
from zsad_bench.bench import time_fn
from zsad_bench.detector import Batch, create_method
from zsad_bench.methods.spg import STATE_FORMAT


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA-synchronised)."""
    return 1e3 * statistics.median(time_fn(fn, device, warmup, iters))


class ShapeOnly(Backbone):
    """Carries the reference backbone's identity, size and width for the SPG detector (no forward)."""

    source = "bench"
    default_layers = ("last",)

    def __init__(self, name: str, size: int, patch: int, dim: int) -> None:
        super().__init__()
        self.name, self.patch_size, self.embed_dim = name, patch, dim
        self.preprocess = Preprocess(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def forward_features(self, images: torch.Tensor, layers=None) -> Features:
        raise RuntimeError("ShapeOnly backbones only describe shapes; the benchmark times the real one")


def fitted_spg(backbone: Backbone, dim: int, width: int, device: torch.device):
    """An SPG detector with random SAE/coefficients of the official sizes (timing only)."""
    det = create_method("spg", backbone, device, sae_width=width)
    gen = torch.Generator().manual_seed(0)
    dictionary = torch.nn.functional.normalize(torch.randn(width, dim, generator=gen), dim=1)
    coef = 0.1 + 0.01 * torch.randn(4, width, generator=gen)
    coef[:, torch.rand(width, generator=gen) < 0.95] = -1.0  # ~5% active atoms, like trained guides
    det.load_state_dict(
        {
            "format": STATE_FORMAT,
            "backbone": backbone.identity,
            "sae_width": width,
            "sae_k": det.config.sae_k,
            "encoder": dictionary.clone(),
            "dictionary": dictionary,
            "dead_mask": torch.zeros(width, dtype=torch.bool),
            "coef": coef,
            "coef_ema": coef,
            "data_fingerprint": "bench",
            "stats": {},
        }
    )
    return det


def reference(name: str, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], ShapeOnly, str]:
    """The reference backbone forward (images -> token grid), its shape descriptor and dtype label."""
    if name == "effnet-lite0":
        from zsad_bench.backbones import create_backbone

        bb = create_backbone("effnet-lite0").to(device)
        probe = bb.forward_features(torch.zeros(1, 3, bb.image_size, bb.image_size, device=device)).layer()
        shape = ShapeOnly("effnet-lite0", bb.image_size, bb.image_size // probe.shape[1], probe.shape[-1])
        return (lambda x: bb.forward_features(x).layer()), shape, "fp32"
    if name == "dinov3-l":
        import timm

        model = timm.create_model("vit_large_patch16_dinov3", pretrained=False, img_size=448).to(device).eval()
        prefix = model.num_prefix_tokens

        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                tokens = model.forward_features(x)[:, prefix:]
            return tokens.float().reshape(x.shape[0], 28, 28, -1)

        return forward, ShapeOnly("dinov3-l", 448, 16, 1024), "bf16"
    raise SystemExit(f"unknown --reference {name}; use effnet-lite0 or dinov3-l")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reference", help="effnet-lite0 (default on CPU) or dinov3-l (default on CUDA)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--width", type=int, default=4096, help="SAE width H (default 4096)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    ref = args.reference or ("dinov3-l" if device.type == "cuda" else "effnet-lite0")
    forward, shape, dtype = reference(ref, device)
    det = fitted_spg(shape, shape.embed_dim, args.width, device)
    rows = []
    with torch.inference_mode():
        for bs in args.batch_sizes:
            images = torch.randn(bs, 3, shape.image_size, shape.image_size, device=device)
            grid = forward(images)
            batch = Batch(samples=[], features=Features({"last": grid}))
            bb_ms = time_ms(lambda images=images: forward(images), device, args.warmup, args.iters) / bs
            spg_ms = time_ms(lambda batch=batch: det.predict(batch), device, args.warmup, args.iters) / bs
            rows.append(
                {
                    "device": str(device),
                    "backbone": f"{ref}@{shape.image_size} {dtype}",
                    "grid": f"{grid.shape[1]}x{grid.shape[2]}x{grid.shape[3]}",
                    "batch": bs,
                    "backbone ms/img": bb_ms,
                    "SPG ms/img": spg_ms,
                    "SPG / backbone": spg_ms / bb_ms,
                }
            )
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3f"))


if __name__ == "__main__":
    main()
