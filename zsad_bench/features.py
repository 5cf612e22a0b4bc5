"""Batched backbone feature extraction with an on-disk, memory-mapped, self-verifying cache.

Layout under the cache root (default ``cache_dir()/"features"``)::

    <group>/meta.json                 everything the features depend on (see :func:`feature_key_parts`)
    <group>/<kk>/<key>.zfc            one entry per image

``group`` hashes (backbone identity, preprocessing, sorted layers, dtype, precision, device class, torch
major.minor, backbone library version); ``key`` hashes the image's absolute path, size and mtime, so an
edited image is recomputed. An entry file is::

    magic b"ZSADFC01" | uint32 header length | JSON header | zero padding to 64 | payload

The JSON header names every tensor (shape, offset) plus the payload length and its CRC-32. Entries are
written to a temporary file and renamed into place; on read the length and CRC are checked, and a
truncated or corrupt entry is recomputed (never used). An entry verified once in this process is not
verified again (entries are immutable once renamed into place). The payload is read through ``numpy.memmap``.

Precision policy (``precision``): ``fp32`` (default, as the official SPG release extracts features:
fp32 weights and activations, TF32 off) and ``tf32`` cache float32 entries; ``bf16`` runs a bf16 copy of
the backbone (weights and activations, not only autocast) and caches float16 entries.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import struct
import weakref
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from zsad_bench.backbones.base import Backbone, Features
from zsad_bench.data.io import DECODING, load_image
from zsad_bench.data.records import Sample
from zsad_bench.errors import DataError, ZsadError
from zsad_bench.paths import cache_dir
from zsad_bench.results import atomic_write_bytes

MAGIC = b"ZSADFC01"
SUFFIX = ".zfc"
ALIGN = 64
DTYPES = {"float16": np.float16, "float32": np.float32}
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
GLOBAL = "__global__"
META_KEYS = ("identity", "preprocess", "layers", "dtype")
PRECISIONS = ("fp32", "tf32", "bf16")
CACHE_DTYPE = {"fp32": "float32", "tf32": "float32", "bf16": "float16"}
# the package that computes a backbone's forward, by the module defining the backbone class
BACKBONE_LIBRARIES = {
    "zsad_bench.backbones.hf": "transformers",
    "zsad_bench.backbones.effnet": "timm",
    "zsad_bench.backbones.openclip": "open_clip_torch",
}
MAX_PENDING_WRITES = 4  # batches queued for the writer thread before extraction waits for it


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ZsadError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")


def device_class(device: str | torch.device) -> str:
    """``cpu``, ``cuda``, ``mps``...: features of one device class are not reused on another."""
    return torch.device(device).type


def backbone_library(backbone: Backbone) -> str:
    """``name==version`` of the library running ``backbone``'s forward ("" for in-package backbones)."""
    package = getattr(backbone, "library", None) or BACKBONE_LIBRARIES.get(type(backbone).__module__)
    if not package:
        return ""
    try:
        return f"{package}=={version(package)}"
    except PackageNotFoundError:
        return f"{package}==?"


def feature_key_parts(backbone: Backbone, precision: str, device: str | torch.device) -> dict[str, str]:
    """What features depend on beyond the backbone identity and layers; part of every feature and fit key."""
    check_precision(precision)
    return {
        "precision": precision,
        "device_class": device_class(device),
        "torch": ".".join(torch.__version__.split("+")[0].split(".")[:2]),
        "library": backbone_library(backbone),
        # how image files become pixels (EXIF orientation, 16-bit scaling): a change recomputes the features
        "decoding": hashlib.sha1(json.dumps(DECODING, sort_keys=True).encode()).hexdigest()[:12],
    }


@contextlib.contextmanager
def precision_context(precision: str) -> Iterator[None]:
    """TF32 matmuls/convolutions on CUDA only under ``tf32`` (off under fp32 and bf16); restored on exit."""
    check_precision(precision)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    allow = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def set_deterministic(enabled: bool) -> None:
    """Deterministic algorithms everywhere (``--deterministic``): CUDA kernels without atomics, cuDNN
    without benchmarking, cuBLAS with a fixed workspace; an op without a deterministic kernel raises.

    On CPU the harness is already bitwise repeatable for a fixed seed, thread count and library versions.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


_BF16_COPIES: weakref.WeakKeyDictionary[Backbone, Backbone] = weakref.WeakKeyDictionary()


def precision_backbone(backbone: Backbone, precision: str, device: torch.device) -> Backbone:
    """``backbone`` on ``device``; under ``bf16`` a bf16 copy (made once per backbone, the original stays fp32)."""
    backbone = backbone.to(device)
    if precision != "bf16":
        return backbone
    copy_ = _BF16_COPIES.get(backbone)
    if copy_ is None:
        copy_ = copy.deepcopy(backbone).to(dtype=torch.bfloat16)
        _BF16_COPIES[backbone] = copy_
    return copy_.to(device)


def default_num_workers(n_images: int, batch_size: int) -> int:
    """Decode workers: one per CPU core the process may use (at most 8); none for a couple of batches."""
    if n_images <= 2 * batch_size:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))


class FeatureCache:
    """On-disk feature store shared by all methods and runs (see the module docstring for the format).

    ``dtype`` None (default) stores each precision in its own dtype (float32 for fp32/tf32, float16 for
    bf16); a named dtype forces it.
    """

    _verified: ClassVar[dict[str, tuple[str, dict[str, Any], int]]] = {}  # path -> (dtype, layout, data start)

    def __init__(self, root: Path | None = None, dtype: str | None = None) -> None:
        if dtype is not None and dtype not in DTYPES:
            raise ZsadError(f"feature cache dtype '{dtype}' is not supported; use one of {sorted(DTYPES)}")
        self.root = Path(root).expanduser() if root is not None else cache_dir() / "features"
        self.dtype = dtype
        self.reads = 0  # entry reads (tests count them)

    def dtype_for(self, precision: str) -> str:
        return self.dtype or CACHE_DTYPE[precision]

    def group_dir(
        self,
        backbone: Backbone,
        layers: Sequence[str],
        dtype: str | None = None,
        key_parts: dict[str, str] | None = None,
    ) -> Path:
        """Folder of the entries of ``backbone`` x ``layers`` x dtype x ``key_parts`` (created with its meta.json)."""
        meta: dict[str, Any] = {
            "identity": backbone.identity,
            "preprocess": repr(backbone.preprocess),
            "layers": sorted(layers),
            "dtype": dtype or self.dtype_for("fp32"),
            **(key_parts or {}),
        }
        digest = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        folder = self.root / f"{backbone.name}-{digest}"
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode(), durable=False)
            except OSError as exc:  # a read-only or missing mount: the first write of a run lands here
                raise ZsadError(
                    f"{self.root}: cannot write the feature cache ({exc.strerror}); "
                    "point ZSAD_BENCH_CACHE at a writable folder"
                ) from None
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

    def write(self, path: Path, tensors: dict[str, torch.Tensor], dtype: str | None = None) -> None:
        """Atomically write ``tensors`` (name -> tensor) as one entry in ``dtype`` (default: the cache's)."""
        dtype = dtype or self.dtype_for("fp32")
        tdtype = TORCH_DTYPES[dtype]
        arrays = {k: np.ascontiguousarray(v.detach().to("cpu", tdtype).numpy()) for k, v in tensors.items()}
        offset, layout = 0, {}
        for name, arr in arrays.items():
            layout[name] = {"shape": list(arr.shape), "offset": offset}
            offset += arr.nbytes
        payload = b"".join(arr.tobytes() for arr in arrays.values())
        header = {"dtype": dtype, "tensors": layout, "nbytes": len(payload), "crc32": zlib.crc32(payload)}
        head = json.dumps(header).encode()
        prefix = MAGIC + struct.pack("<I", len(head)) + head
        prefix += b"\0" * (-len(prefix) % ALIGN)
        FeatureCache._verified.pop(str(path), None)
        atomic_write_bytes(path, prefix + payload, durable=False)

    def verify(self, path: Path, dtype: str | None = None) -> bool:
        """Whether ``path`` holds a valid entry of ``dtype`` (length and CRC checked once per process)."""
        return self._layout(path, dtype or self.dtype_for("fp32")) is not None

    def _layout(self, path: Path, dtype: str) -> tuple[dict[str, Any], int] | None:
        known = FeatureCache._verified.get(str(path))
        if known is not None and known[0] == dtype:
            return known[1], known[2]
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
            if header.get("dtype") != dtype or size != data_start + header["nbytes"] or header["nbytes"] == 0:
                return None
            raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(header["nbytes"],))
            if zlib.crc32(raw) != header["crc32"]:
                return None
        except (OSError, ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError):
            return None
        FeatureCache._verified[str(path)] = (dtype, header["tensors"], data_start)
        return header["tensors"], data_start

    def read(self, path: Path, dtype: str | None = None, native: bool = False) -> dict[str, torch.Tensor] | None:
        """Tensors of a valid entry (float32, or the stored dtype with ``native``), or None when it is
        missing, truncated or corrupt."""
        dtype = dtype or self.dtype_for("fp32")
        self.reads += 1
        found = self._layout(path, dtype)
        if found is None:
            return None
        layout, data_start = found
        np_dtype = DTYPES[dtype]
        try:
            nbytes = sum(int(np.prod(s["shape"])) for s in layout.values()) * np.dtype(np_dtype).itemsize
            raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(nbytes,))
            out = {}
            for name, spec in layout.items():
                count = int(np.prod(spec["shape"]))
                arr = np.frombuffer(raw, dtype=np_dtype, count=count, offset=spec["offset"]).reshape(spec["shape"])
                out[name] = torch.from_numpy(arr.copy() if native else arr.astype(np.float32))
            return out
        except (OSError, ValueError):
            FeatureCache._verified.pop(str(path), None)
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
        """Location, total entries and bytes, and one summary per (backbone, layers, dtype, precision) group."""
        groups = []
        for folder, meta in self._groups():
            files = list(folder.glob(f"*/*{SUFFIX}"))
            groups.append(
                {
                    "dir": str(folder),
                    "identity": meta["identity"],
                    "layers": meta["layers"],
                    "dtype": meta["dtype"],
                    "precision": meta.get("precision", ""),
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
            FeatureCache._verified.clear()
        return removed


class ImageFiles(TorchDataset):
    """``(index, preprocessed image, error)`` of ``samples[indices]`` for a DataLoader.

    A bad image does not raise inside a worker (that would reach the user as a worker traceback): its
    one-line :class:`DataError` message travels back as ``error`` and :func:`raise_batch_error` raises it.
    """

    def __init__(self, samples: Sequence[Sample], preprocess: Any, indices: Sequence[int]) -> None:
        self.samples, self.preprocess, self.indices = samples, preprocess, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        idx = self.indices[i]
        try:
            return idx, self.preprocess(load_image(self.samples[idx].image_path)), ""
        except ZsadError as exc:
            return idx, None, str(exc)


def collate_images(items: list[tuple[int, torch.Tensor | None, str]]) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Stack a batch of :class:`ImageFiles` items; a batch holding a bad image carries its message instead."""
    idx = torch.tensor([i for i, _, _ in items], dtype=torch.long)
    errors = [e for _, _, e in items if e]
    if errors:
        return idx, None, errors[0]
    return idx, torch.stack([t for _, t, _ in items]), ""


def raise_batch_error(error: str) -> None:
    if error:
        raise DataError(error)


def image_loader(
    samples: Sequence[Sample], preprocess: Any, indices: Sequence[int], batch_size: int, num_workers: int, pin: bool
) -> DataLoader:
    """Batches ``(indices, images, error)`` decoded by ``num_workers`` processes, pinned when ``pin``."""
    return DataLoader(
        ImageFiles(samples, preprocess, indices),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin,
        collate_fn=collate_images,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )


def to_host(flat: torch.Tensor) -> torch.Tensor:
    """The one device-to-host copy of a batch's packed features (pinned, non-blocking on CUDA)."""
    if flat.device.type == "cpu":
        return flat
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    return host


def _pack(feats: Features, layers: Sequence[str], dtype: torch.dtype) -> tuple[torch.Tensor, list[tuple]]:
    """Every layer's grid and the global token of a batch as one ``(B, total)`` tensor of ``dtype``."""
    parts = [(name, feats.patches[name]) for name in layers]
    if feats.global_token is not None:
        parts.append((GLOBAL, feats.global_token))
    b = parts[0][1].shape[0]
    flat = torch.cat([t.reshape(b, -1).to(dtype) for _, t in parts], dim=1)
    layout, offset = [], 0
    for name, t in parts:
        n = t[0].numel()
        layout.append((name, offset, n, tuple(t.shape[1:])))
        offset += n
    return flat, layout


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
        num_workers: int | None,
        device: torch.device,
        progress: bool,
        precision: str = "fp32",
    ) -> None:
        self.backbone = backbone
        self.samples = list(samples)
        self.layers = tuple(layers)
        self.cache = cache
        self.batch_size, self.num_workers, self.device, self.progress = batch_size, num_workers, device, progress
        self.precision = precision
        self.key_parts = feature_key_parts(backbone, precision, device)
        self.dtype = cache.dtype_for(precision) if cache is not None else "float32"
        self.hits = 0
        self.misses = 0
        self._memory: dict[int, dict[str, torch.Tensor]] = {}
        self._paths: list[Path] = []
        if cache is not None:
            group = cache.group_dir(backbone, self.layers, self.dtype, self.key_parts)
            self._paths = [cache.entry_path(group, s.image_path) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def build(self) -> FeatureStore:
        """Compute every entry that is not already valid in the cache."""
        if self.cache is None:
            todo = list(range(len(self.samples)))
        else:
            todo = [i for i, p in enumerate(self._paths) if not self.cache.verify(p, self.dtype)]
            self.hits += len(self.samples) - len(todo)
        self._compute(todo)
        return self

    def get(self, indices: Sequence[int], native: bool = False) -> Features:
        """Features of ``samples[indices]`` on the CPU: grids ``(B, h, w, C)`` per layer, and the global token;
        float32, or the stored dtype with ``native``."""
        entries = [self._entry(int(i), native) for i in indices]
        patches = {name: torch.stack([e[name] for e in entries]) for name in self.layers}
        has_global = bool(entries) and all(GLOBAL in e for e in entries)
        return Features(patches, torch.stack([e[GLOBAL] for e in entries]) if has_global else None)

    def _entry(self, i: int, native: bool) -> dict[str, torch.Tensor]:
        if self.cache is None:
            return self._memory[i]
        entry = self.cache.read(self._paths[i], self.dtype, native)
        if entry is None:
            self._compute([i])
            entry = self.cache.read(self._paths[i], self.dtype, native)
            if entry is None:
                raise ZsadError(f"feature cache entry {self._paths[i]} cannot be written back; check disk space")
        return entry

    def _compute(self, indices: Sequence[int]) -> None:
        """Decode (``num_workers`` processes) -> forward -> one packed device-to-host copy per batch ->
        cache writes on a writer thread, the copy of batch i finishing while batch i+1 runs."""
        if not indices:
            return
        self.misses += len(indices)
        device = self.device
        cuda = device.type == "cuda"
        backbone = precision_backbone(self.backbone, self.precision, device)
        in_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        channels_last = cuda and getattr(backbone, "channels_last", False)
        if channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        workers = self.num_workers
        if workers is None:
            workers = default_num_workers(len(indices), self.batch_size)
        loader = image_loader(self.samples, backbone.preprocess, indices, self.batch_size, workers, cuda)
        batches: Any = loader
        if self.progress:
            from tqdm import tqdm

            batches = tqdm(loader, desc=f"features {backbone.name}", unit="batch", leave=False)
        out_dtype = TORCH_DTYPES[self.dtype]
        pending: list[Future] = []
        previous: tuple | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zsad-cache-writer") as writer:
            try:
                with torch.inference_mode(), precision_context(self.precision):
                    for idx, images, error in batches:
                        raise_batch_error(error)
                        images = images.to(device, dtype=in_dtype, non_blocking=True)
                        if channels_last:
                            images = images.contiguous(memory_format=torch.channels_last)
                        flat, layout = _pack(backbone.forward_features(images, self.layers), self.layers, out_dtype)
                        host = to_host(flat)
                        done = torch.cuda.Event() if cuda else None
                        if done is not None:
                            done.record()
                        if previous is not None:
                            pending.append(self._deliver(writer, *previous))
                        previous = (idx, host, layout, done)
                        while len(pending) > MAX_PENDING_WRITES:
                            pending.pop(0).result()
                    if previous is not None:
                        pending.append(self._deliver(writer, *previous))
            finally:
                for fut in pending:
                    fut.result()

    def _deliver(
        self, writer: ThreadPoolExecutor, idx: torch.Tensor, host: torch.Tensor, layout: list, done: Any
    ) -> Future:
        """Split a finished batch into per-image entries: kept in memory, or written by the writer thread."""
        if done is not None:
            done.synchronize()
        entries = []
        for j, i in enumerate(idx.tolist()):
            row = host[j]
            entries.append((i, {name: row[off : off + n].view(shape) for name, off, n, shape in layout}))
        if self.cache is None:
            for i, entry in entries:
                self._memory[i] = {name: t.clone() for name, t in entry.items()}
            fut: Future = Future()
            fut.set_result(None)
            return fut
        cache, dtype = self.cache, self.dtype
        return writer.submit(lambda: [cache.write(self._paths[i], entry, dtype) for i, entry in entries])


def extract_features(
    backbone: Backbone,
    samples: Sequence[Sample],
    layers: Sequence[str] | None = None,
    cache: FeatureCache | None = None,
    batch_size: int = 16,
    num_workers: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    precision: str = "fp32",
) -> FeatureStore:
    """Run ``backbone`` over ``samples`` (only where the cache has no valid entry) and return the store.

    Images are decoded by ``num_workers`` DataLoader processes (None: from the CPU count), batches pinned on
    CUDA, the forward runs under ``torch.inference_mode`` at ``precision`` (see the module docstring) and
    channels-last (conv backbones) on CUDA. Without ``cache`` the features are kept in memory (float32).
    """
    if batch_size < 1:
        raise ZsadError(f"--batch-size must be >= 1 (got {batch_size})")
    check_precision(precision)
    layers = tuple(layers or backbone.default_layers)
    store = FeatureStore(
        backbone, samples, layers, cache, batch_size, num_workers, torch.device(device), progress, precision
    )
    return store.build()
