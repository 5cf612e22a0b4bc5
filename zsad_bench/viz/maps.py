"""``--save-maps``: anomaly maps stored beside the results file, fp16 and compressed, at a chosen size.

Layout: ``<results>.maps/seed=<seed>/<leg>/<category>.npz`` (``results/runs/X.json`` -> ``results/runs/X.maps/``),
each holding ``paths`` (image paths, as in the per-image records), ``maps`` (``(N, S, S)`` float16),
``masks`` (ground truth at ``S``, bit-packed; absent when the writer was given none), ``leg``, ``category``.
A file is written once its category is complete (atomically), so an interrupted run never leaves half a file.

The runner's evaluation loop calls::

    writer = MapWriter.open(out, spec.save_maps, n_images, log)      # once, says the size first
    writer.add(seed, leg.name, category, paths, maps, masks)          # after each batch
    writer.close_category(seed, leg.name, category)                   # after the category
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zsad_bench.errors import ZsadError
from zsad_bench.results import atomic_write_bytes

# fp16 anomaly maps are smooth; zlib (np.savez_compressed) shrinks them by about this factor (measured ~1.2-1.6x
# on SPG/toy maps); used only for the size estimate printed before writing.
COMPRESSION = 1.3
MIN_SIZE, MAX_SIZE = 16, 1024


def maps_dir(results_path: Path | str) -> Path:
    """The folder of saved maps of a results file."""
    return Path(results_path).with_suffix(".maps")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name)


def estimate_bytes(n_images: int, size: int) -> int:
    """Expected disk use of ``n_images`` maps at ``size x size``: n x size^2 x 2 bytes / compression."""
    return int(n_images * size * size * 2 / COMPRESSION)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def check_size(size: int) -> int:
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ZsadError(f"--save-maps {size}: map size must be between {MIN_SIZE} and {MAX_SIZE} pixels, e.g. 256")
    return int(size)


class MapWriter:
    """Buffers one category's maps at a time and writes it as one compressed ``.npz``."""

    def __init__(self, root: Path, size: int) -> None:
        self.root = Path(root)
        self.size = check_size(size)
        self._buf: dict[tuple[int, str, str], tuple[list[str], list[np.ndarray], list[np.ndarray] | None]] = {}
        self.written: list[Path] = []

    @classmethod
    def open(
        cls,
        results_path: Path | str,
        size: int,
        n_images: int,
        log: Callable[[str], None] | None = print,
    ) -> MapWriter:
        """A writer for ``results_path``; logs the folder and the estimated size of ``n_images`` maps first."""
        writer = cls(maps_dir(results_path), size)
        if log is not None:
            raw = n_images * writer.size**2 * 2
            log(
                f"saving {n_images} anomaly maps at {writer.size}x{writer.size} (fp16, compressed) to {writer.root}: "
                f"about {human_bytes(estimate_bytes(n_images, writer.size))} ({human_bytes(raw)} uncompressed)"
            )
        return writer

    def add(
        self,
        seed: int,
        leg: str,
        category: str,
        paths: Sequence[str],
        maps: torch.Tensor | np.ndarray,
        masks: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Add one batch: ``maps`` ``(B, H, W)`` (any size; resized bilinearly to ``size``), ``masks`` ``(B, H, W)``
        bool (resized nearest)."""
        maps_t = torch.as_tensor(np.asarray(maps) if not isinstance(maps, torch.Tensor) else maps).float().cpu()
        if maps_t.ndim != 3 or maps_t.shape[0] != len(paths):
            raise ValueError(f"maps must be (B, H, W) with B == len(paths); got {tuple(maps_t.shape)}")
        s = self.size
        if maps_t.shape[-2:] != (s, s):
            maps_t = F.interpolate(maps_t[:, None], size=(s, s), mode="bilinear", align_corners=False)[:, 0]
        key = (int(seed), leg, category)
        paths_l, maps_l, masks_l = self._buf.setdefault(key, ([], [], [] if masks is not None else None))
        paths_l += [str(p) for p in paths]
        maps_l.append(maps_t.numpy().astype(np.float16))
        if masks_l is not None:
            if masks is None:
                raise ValueError("masks given for some batches of a category but not for others")
            m = torch.as_tensor(np.asarray(masks, dtype=np.float32) if not isinstance(masks, torch.Tensor) else masks)
            m = m.float().cpu()
            if m.shape[-2:] != (s, s):
                m = F.interpolate(m[:, None], size=(s, s), mode="nearest")[:, 0]
            masks_l.append(m.numpy() > 0.5)

    def close_category(self, seed: int, leg: str, category: str) -> Path:
        """Write the buffered maps of one category; returns the file."""
        key = (int(seed), leg, category)
        if key not in self._buf:
            raise ValueError(f"no maps added for seed {seed}, leg {leg}, category {category}")
        paths_l, maps_l, masks_l = self._buf.pop(key)
        arrays: dict[str, np.ndarray] = {
            "paths": np.array(paths_l, dtype=str),
            "maps": np.concatenate(maps_l),
            "leg": np.array(leg),
            "category": np.array(category),
        }
        if masks_l is not None:
            masks = np.concatenate(masks_l)
            arrays["masks"] = np.packbits(masks.reshape(len(masks), -1), axis=1)
        path = self.root / f"seed={int(seed)}" / _safe(leg) / f"{_safe(category)}.npz"
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())
        self.written.append(path)
        return path


@dataclass
class SavedMaps:
    """One category's saved maps: ``maps`` float32 ``(N, S, S)``; ``masks`` bool ``(N, S, S)`` or None."""

    leg: str
    category: str
    paths: list[str]
    maps: np.ndarray
    masks: np.ndarray | None

    def select(self, paths: Sequence[str]) -> SavedMaps:
        """The maps of ``paths`` (in that order)."""
        index = {p: i for i, p in enumerate(self.paths)}
        missing = [p for p in paths if p not in index]
        if missing:
            raise ZsadError(
                f"the maps of {self.category} lack {missing[0]}; show runs evaluated on the same images together"
            )
        idx = [index[p] for p in paths]
        return SavedMaps(
            self.leg, self.category, list(paths), self.maps[idx], None if self.masks is None else self.masks[idx]
        )


def read_maps(results_path: Path | str, category: str, seed: int | None = None, leg: str | None = None) -> SavedMaps:
    """Saved maps of ``category`` (first seed/leg found unless given); raises ZsadError when none were saved."""
    root = maps_dir(results_path)
    seed_glob = f"seed={int(seed)}" if seed is not None else "seed=*"
    leg_glob = _safe(leg) if leg is not None else "*"
    found = sorted(root.glob(f"{seed_glob}/{leg_glob}/{_safe(category)}.npz"))
    if not found:
        of = f"category '{category}'" + (f" and seed {seed}" if seed is not None else "")
        raise ZsadError(f"{results_path}: no saved maps for {of}; re-run with --save-maps SIZE")
    try:
        with np.load(found[0], allow_pickle=False) as z:
            maps = z["maps"].astype(np.float32)
            n, s = maps.shape[0], maps.shape[-1]
            masks = None
            if "masks" in z:
                masks = np.unpackbits(z["masks"], axis=1, count=s * s).reshape(n, s, s).astype(bool)
            return SavedMaps(str(z["leg"]), str(z["category"]), [str(p) for p in z["paths"]], maps, masks)
    except (OSError, ValueError, KeyError) as exc:
        raise ZsadError(f"{found[0]}: unreadable saved maps ({exc}); delete it and re-run with --save-maps") from None


def has_maps(results_path: Path | str) -> bool:
    return any(maps_dir(results_path).glob("seed=*/*/*.npz"))
