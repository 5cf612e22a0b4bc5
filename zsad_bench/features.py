"""Batched backbone feature extraction with an on-disk, memory-mapped, self-verifying cache.

Layout under the cache root (default ``cache_dir()/"features"``)::

    <group>/meta.json                 backbone identity, preprocessing, layers, dtype of this group
    <group>/<kk>/<key>.zfc            one entry per image

``group`` hashes (backbone identity, preprocessing, sorted layers, dtype); ``key`` hashes the image's
absolute path, size and mtime, so an edited image is recomputed. An entry file is::

    magic b"ZSADFC01" | uint32 header length | JSON header | zero padding to 64 | payload

The JSON header names every tensor (shape, offset) plus the payload length and its CRC-32. Entries are
written to a temporary file and renamed into place; on read the length and CRC are checked, and a
truncated or corrupt entry is recomputed (never used). The payload is read through ``numpy.memmap``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from zsad_bench.backbones.base import Backbone, Features
from zsad_bench.data.io import load_image
from zsad_bench.data.records import Sample
from zsad_bench.errors import DataError, ZsadError
from zsad_bench.paths import cache_dir
from zsad_bench.results import atomic_write_bytes

MAGIC = b"ZSADFC01"
SUFFIX = ".zfc"
ALIGN = 64
DTYPES = {"float16": np.float16, "float32": np.float32}
GLOBAL = "__global__"
META_KEYS = ("identity", "preprocess", "layers", "dtype")


class FeatureCache:
    """On-disk feature store shared by all methods and runs (see the module docstring for the format)."""

    def __init__(self, root: Path | None = None, dtype: str = "float16") -> None:
        if dtype not in DTYPES:
            raise ZsadError(f"feature cache dtype '{dtype}' is not supported; use one of {sorted(DTYPES)}")
        self.root = Path(root).expanduser() if root is not None else cache_dir() / "features"
        self.dtype = dtype

    def group_dir(self, backbone: Backbone, layers: Sequence[str]) -> Path:
        """Folder holding the entries of ``backbone`` x ``layers`` x dtype (created with its meta.json)."""
        meta: dict[str, Any] = {
            "identity": backbone.identity,
            "preprocess": repr(backbone.preprocess),
            "layers": sorted(layers),
            "dtype": self.dtype,
        }
        digest = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        folder = self.root / f"{backbone.name}-{digest}"
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode(), durable=False)
        return folder

    @staticmethod
    def entry_path(group: Path, image_path: Path) -> Path:
        """Entry file of one image: keyed by absolute path, size and mtime of the image file."""
        path = Path(image_path).resolve()
        try:
            st = path.stat()
        except FileNotFoundError:
            raise DataError(f"{image_path}: image file not found; check the dataset root") from None
        key = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        return group / key[:2] / f"{key}{SUFFIX}"

    def write(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        """Atomically write ``tensors`` (name -> tensor) as one entry in the cache dtype."""
        np_dtype = DTYPES[self.dtype]
        arrays = {k: v.detach().to("cpu", torch.float32).numpy().astype(np_dtype) for k, v in tensors.items()}
        offset, layout = 0, {}
        for name, arr in arrays.items():
            layout[name] = {"shape": list(arr.shape), "offset": offset}
            offset += arr.nbytes
        payload = b"".join(arr.tobytes() for arr in arrays.values())
        header = {"dtype": self.dtype, "tensors": layout, "nbytes": len(payload), "crc32": zlib.crc32(payload)}
        head = json.dumps(header).encode()
        prefix = MAGIC + struct.pack("<I", len(head)) + head
        prefix += b"\0" * (-len(prefix) % ALIGN)
        atomic_write_bytes(path, prefix + payload, durable=False)

    def read(self, path: Path) -> dict[str, torch.Tensor] | None:
        """Float32 tensors of a valid entry, or None when it is missing, truncated or corrupt."""
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                start = fh.read(len(MAGIC) + 4)
                if len(start) < len(MAGIC) + 4 or start[: len(MAGIC)] != MAGIC:
                    return None
                (head_len,) = struct.unpack("<I", start[len(MAGIC) :])
                header = json.loads(fh.read(head_len))
            data_start = len(MAGIC) + 4 + head_len
            data_start += -data_start % ALIGN
            if header.get("dtype") != self.dtype or size != data_start + header["nbytes"]:
                return None
            if header["nbytes"] == 0:
                return None
            raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(header["nbytes"],))
            if zlib.crc32(raw) != header["crc32"]:
                return None
            np_dtype = DTYPES[self.dtype]
            out = {}
            for name, spec in header["tensors"].items():
                count = int(np.prod(spec["shape"]))
                arr = np.frombuffer(raw, dtype=np_dtype, count=count, offset=spec["offset"]).reshape(spec["shape"])
                out[name] = torch.from_numpy(arr.astype(np.float32))
            return out
        except (OSError, ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError):
            return None

    def _groups(self) -> list[tuple[Path, dict[str, Any]]]:
        """(folder, meta) of every cache group under the root; folders without our meta.json are ignored."""
        found = []
        for meta_path in sorted(self.root.glob("*/meta.json")) if self.root.is_dir() else []:
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(meta, dict) and set(META_KEYS) <= set(meta):
                found.append((meta_path.parent, meta))
        return found

    def info(self) -> dict[str, Any]:
        """Location, total entries and bytes, and one summary per (backbone, layers, dtype) group."""
        groups = []
        for folder, meta in self._groups():
            files = list(folder.glob(f"*/*{SUFFIX}"))
            groups.append(
                {
                    "dir": str(folder),
                    "identity": meta["identity"],
                    "layers": meta["layers"],
                    "dtype": meta["dtype"],
                    "entries": len(files),
                    "bytes": sum(f.stat().st_size for f in files),
                }
            )
        return {
            "root": str(self.root),
            "entries": sum(g["entries"] for g in groups),
            "bytes": sum(g["bytes"] for g in groups),
            "groups": groups,
        }

    def clear(self) -> int:
        """Delete every cache group under the root (folders with our meta.json only); returns entries removed."""
        removed = 0
        for folder, _ in self._groups():
            removed += len(list(folder.glob(f"*/*{SUFFIX}")))
            shutil.rmtree(folder)
        return removed


class _Images(TorchDataset):
    def __init__(self, samples: Sequence[Sample], backbone: Backbone, indices: Sequence[int]) -> None:
        self.samples, self.preprocess, self.indices = samples, backbone.preprocess, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        idx = self.indices[i]
        return idx, self.preprocess(load_image(self.samples[idx].image_path))


class FeatureStore:
    """Features of ``samples`` (cached on disk, or in memory without a cache), fetched by index.

    :meth:`get` is a ``features`` getter for :class:`zsad_bench.source.FeatureSource`. An entry found
    invalid at read time is recomputed with the backbone. ``hits``/``misses`` count cache entries reused
    and computed.
    """

    def __init__(
        self,
        backbone: Backbone,
        samples: Sequence[Sample],
        layers: Sequence[str],
        cache: FeatureCache | None,
        batch_size: int,
        num_workers: int,
        device: torch.device,
        progress: bool,
    ) -> None:
        self.backbone = backbone
        self.samples = list(samples)
        self.layers = tuple(layers)
        self.cache = cache
        self.batch_size, self.num_workers, self.device, self.progress = batch_size, num_workers, device, progress
        self.hits = 0
        self.misses = 0
        self._memory: dict[int, dict[str, torch.Tensor]] = {}
        self._paths: list[Path] = []
        if cache is not None:
            group = cache.group_dir(backbone, self.layers)
            self._paths = [cache.entry_path(group, s.image_path) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def build(self) -> FeatureStore:
        """Compute every entry that is not already valid in the cache."""
        if self.cache is None:
            todo = list(range(len(self.samples)))
        else:
            todo = [i for i, p in enumerate(self._paths) if self.cache.read(p) is None]
            self.hits += len(self.samples) - len(todo)
        self._compute(todo)
        return self

    def get(self, indices: Sequence[int]) -> Features:
        """Float32 CPU features of ``samples[indices]``: grids ``(B, h, w, C)`` per layer, and the global token."""
        entries = [self._entry(int(i)) for i in indices]
        patches = {name: torch.stack([e[name] for e in entries]) for name in self.layers}
        has_global = bool(entries) and all(GLOBAL in e for e in entries)
        return Features(patches, torch.stack([e[GLOBAL] for e in entries]) if has_global else None)

    def _entry(self, i: int) -> dict[str, torch.Tensor]:
        if self.cache is None:
            return self._memory[i]
        entry = self.cache.read(self._paths[i])
        if entry is None:
            self._compute([i])
            entry = self.cache.read(self._paths[i])
            if entry is None:
                raise ZsadError(f"feature cache entry {self._paths[i]} cannot be written back; check disk space")
        return entry

    def _compute(self, indices: Sequence[int]) -> None:
        if not indices:
            return
        self.misses += len(indices)
        device = self.device
        cuda = device.type == "cuda"
        backbone = self.backbone.to(device)
        channels_last = cuda and getattr(backbone, "channels_last", False)
        if channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        loader = DataLoader(
            _Images(self.samples, backbone, indices),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=cuda,
            persistent_workers=False,
        )
        batches: Any = loader
        if self.progress:
            from tqdm import tqdm

            batches = tqdm(loader, desc=f"features {backbone.name}", unit="batch", leave=False)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        with torch.inference_mode():
            for idx, images in batches:
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast:
                    feats = backbone.forward_features(images, self.layers)
                for j, i in enumerate(idx.tolist()):
                    entry = {name: _own(feats.patches[name][j]) for name in self.layers}
                    if feats.global_token is not None:
                        entry[GLOBAL] = _own(feats.global_token[j])
                    if self.cache is None:
                        self._memory[i] = entry
                    else:
                        self.cache.write(self._paths[i], entry)


def _own(t: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy that does not keep the whole batch tensor alive."""
    return t.detach().to("cpu", torch.float32, copy=True)


def extract_features(
    backbone: Backbone,
    samples: Sequence[Sample],
    layers: Sequence[str] | None = None,
    cache: FeatureCache | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> FeatureStore:
    """Run ``backbone`` over ``samples`` (only where the cache has no valid entry) and return the store.

    Batched through a DataLoader (``num_workers``, pinned memory on CUDA), under ``torch.inference_mode``,
    bf16 autocast and channels-last (conv backbones) on CUDA, fp32 on CPU. Without ``cache`` the
    features are kept in memory (float32).
    """
    if batch_size < 1:
        raise ZsadError(f"--batch-size must be >= 1 (got {batch_size})")
    layers = tuple(layers or backbone.default_layers)
    store = FeatureStore(backbone, samples, layers, cache, batch_size, num_workers, torch.device(device), progress)
    return store.build()
