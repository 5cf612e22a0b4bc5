"""``zsad-bench atoms RUN``: SPG interpretability, shipped with the method (entry point ``zsad_bench.commands``).

Lists the active atoms of a fitted SPG run's anomaly guide and renders, for the top atoms, the
auxiliary images whose patches activate them most.
"""

from __future__ import annotations

import argparse
import heapq
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zsad_bench.cli.common import output_file
from zsad_bench.errors import ZsadError

if TYPE_CHECKING:  # the parser is built on every CLI call: import the method only when atoms runs
    from zsad_bench.methods.spg import SPG

LIST_ATOMS = 40  # active atoms printed by `atoms` unless --list-all


def add_parser(sub: argparse._SubParsersAction) -> None:
    atoms = sub.add_parser(
        "atoms",
        help="SPG interpretability: the anomaly guide's atoms and their top auxiliary patches",
        description="List the active atoms of a fitted SPG run's anomaly guide with their coefficients and render, "
        "for the top atoms, the auxiliary images with the strongest patch activation (heat-map overlays).",
    )
    atoms.add_argument("run", type=Path, metavar="RUN", help="results JSON of a finished spg / spg-topk run")
    atoms.add_argument("--top", type=int, default=4, help="atoms to render (largest coefficients; default 4)")
    atoms.add_argument("--patches", type=int, default=8, help="top patches (distinct images) per atom (default 8)")
    atoms.add_argument("--out", "-o", type=output_file, help="PNG path (default: RUN with suffix -atoms.png)")
    atoms.add_argument("--leg", type=int, default=0, help="protocol leg index of the run (default 0)")
    atoms.add_argument("--seed", type=int, help="seed of the run's checkpoint (default: its first seed)")
    atoms.add_argument("--device", default="cpu", help="device for the SAE encode (default cpu)")
    atoms.add_argument("--list-all", action="store_true", help=f"list every active atom, not the first {LIST_ATOMS}")
    atoms.set_defaults(func=_atoms)


def top_patches(detector: SPG, source: Any, atoms: list[int], n: int, batch_size: int = 16) -> list[list[tuple]]:
    """Per atom, the ``n`` aux images whose best patch activates it most, best first.

    Each entry is ``(activation, sample index, heat (h, w) tensor, (row, col) of the best patch)``;
    images whose best activation is 0 are dropped (as the release does).
    """
    heaps: list[list[tuple]] = [[] for _ in atoms]
    offset = 0
    counter = 0
    for batch in source.batches(batch_size):
        act = detector.atom_activations(batch.features, atoms)  # (B, A, h, w)
        w = act.shape[-1]
        for b in range(act.shape[0]):
            for a in range(len(atoms)):
                heat = act[b, a]
                best = float(heat.max())
                if best <= 0:
                    continue
                pos = int(heat.argmax())
                item = (best, counter, offset + b, heat.clone(), (pos // w, pos % w))
                counter += 1
                if len(heaps[a]) < n:
                    heapq.heappush(heaps[a], item)
                elif best > heaps[a][0][0]:
                    heapq.heapreplace(heaps[a], item)
        offset += act.shape[0]
    return [[(s, i, h, rc) for s, _, i, h, rc in sorted(heap, key=lambda t: -t[0])] for heap in heaps]


def render_atoms(
    source: Any, chosen: list[tuple[int, float]], found: list[list[tuple]], n: int, size: int, out: Path
) -> None:
    """A PNG grid: one row per atom, ``n`` tiles of image + bilinear activation heat map (jet, alpha 0.45)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch.nn.functional as F
    from matplotlib.patches import Rectangle

    from zsad_bench.data.io import load_image

    fig, axes = plt.subplots(len(chosen), n, figsize=(2.2 * n, 2.4 * len(chosen)), squeeze=False)
    for row, ((atom, coef), hits) in enumerate(zip(chosen, found, strict=True)):
        vmax = hits[0][0] if hits else 1.0
        for col in range(n):
            ax = axes[row][col]
            ax.set_axis_off()
            if col >= len(hits):
                continue
            act, idx, heat, (r, c) = hits[col]
            sample = source.samples[idx]
            img = np.asarray(load_image(sample.image_path).resize((size, size)))
            up = F.interpolate(heat[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
            ax.imshow(img)
            ax.imshow(up.numpy(), cmap="jet", alpha=0.45, vmin=0.0, vmax=vmax)
            cell_h, cell_w = size / heat.shape[0], size / heat.shape[1]
            ax.add_patch(Rectangle((c * cell_w, r * cell_h), cell_w, cell_h, fill=False, edgecolor="white", lw=1.2))
            ax.set_title(f"{sample.category} z={act:.2f}", fontsize=7)
        axes[row][0].text(
            -0.08, 0.5, f"atom #{atom}\nc={coef:.3g}", transform=axes[row][0].transAxes, ha="right", va="center"
        )
    fig.suptitle("SPG anomaly-guide atoms: top auxiliary patches (white box) and activation maps", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _atoms(args: argparse.Namespace) -> int:
    from zsad_bench.methods.spg import SPG
    from zsad_bench.runner import rebuild

    if args.top < 1 or args.patches < 1:
        raise ZsadError("--top and --patches must be >= 1")
    detector, source = rebuild(args.run, seed=args.seed, leg_index=args.leg, device=args.device)
    if not isinstance(detector, SPG):
        raise ZsadError(f"{args.run}: a run of method '{detector.name}'; atoms needs an spg or spg-topk run")
    active = detector.anomaly_atoms()
    shown = active if args.list_all else active[:LIST_ATOMS]
    more = "" if len(shown) == len(active) else f" (first {len(shown)}; --list-all for all)"
    print(f"anomaly guide: {len(active)} active atoms (coefficient > 0), largest first{more}")
    print(textwrap.fill("  ".join(f"#{a}:{c:.4g}" for a, c in shown), width=110, break_on_hyphens=False))
    if not active:
        raise ZsadError(f"{args.run}: the anomaly guide has no active atom; nothing to render")
    chosen = active[: args.top]
    found = top_patches(detector, source, [a for a, _ in chosen], args.patches)
    for (atom, coef), hits in zip(chosen, found, strict=True):
        names = ", ".join(f"{source.samples[i].key}@{rc}:{s:.3g}" for s, i, _, rc in hits)
        print(f"atom #{atom} (c={coef:.4g}): {names or 'never fires on the auxiliary set'}")
    out = args.out or args.run.with_name(f"{args.run.stem}-atoms.png")
    render_atoms(source, chosen, found, args.patches, detector.backbone.image_size, out)
    print(f"atom grid written to {out}")
    return 0
